"""Which faiss index makes a gallery's shortlists, and why: a name or factory string, or the
default for the gallery's size, resolved to a faiss factory string and its search knobs.

Nothing here imports faiss: a bad `--index` is refused before any heavy import or file read.
Small galleries get the exact flat index, so their shortlists stay exactly what they always
were; past EXACT_LIMIT images an inverted file (IVF) searches a few lists instead of every
vector, and past COMPRESSED_LIMIT product quantisation (PQ) keeps the index in memory at a
few bytes per image instead of 4 B per dimension.
"""

import math
import re
from dataclasses import dataclass

from elvis_cli.util.errors import InputError

AUTO = "auto"
FLAT = "Flat"  # the exact index's factory string
INDEX_NAMES = (AUTO, "flat", "ivf", "hnsw", "ivfpq")

EXACT_LIMIT = 200_000  # auto: flat up to this many gallery images
COMPRESSED_LIMIT = 5_000_000  # auto: ivfpq from here (IVF-Flat holds every vector at float32)

HNSW_LINKS = 32  # graph neighbours per vector (faiss' HNSW32)
DEFAULT_EF_SEARCH = 128  # HNSW candidates kept while searching, raised to k where smaller
PQ_SUBVECTOR_DIM = 8  # dimensions per PQ sub-quantiser (one byte each)
PROBED_FRACTION = 1 / 64  # default nprobe: this share of the lists, at least MIN_NPROBE
MIN_NPROBE = 8

# the leading token of a faiss factory string (faiss/index_factory.cpp)
_FACTORY_START = re.compile(r"^(Flat|IVF|IMI|HNSW|NSG|PQ|OPQ|PCA|PCAR|PCAW|ITQ|RR|L2norm|SQ|LSH|"
                            r"RFlat|Refine|IDMap|IDMap2|LSQ|RQ|PRQ|PLSQ|NNDescent|Pad)")
_FACTORY_CHARS = re.compile(r"^[A-Za-z0-9_,.()=+-]+$")


@dataclass(frozen=True)
class IndexConfig:
    """How shortlists search the gallery: `index` is auto (by gallery size), flat (exact),
    ivf, hnsw, ivfpq, or a faiss factory string (e.g. "IVF4096,SQ8"); `nprobe` (IVF lists
    searched) and `ef_search` (HNSW candidates) trade speed for recall, None: the defaults
    above. They act at search time only: changing them never rebuilds a saved index."""

    index: str = AUTO
    nprobe: int | None = None
    ef_search: int | None = None


@dataclass(frozen=True)
class IndexPlan:
    """The index a gallery gets: its faiss factory string, the knobs it is searched with, and
    the reason it was chosen (printed)."""

    name: str  # flat, ivf, hnsw, ivfpq, or "factory" for a string given as it is
    factory: str
    reason: str
    nprobe: int | None = None
    ef_search: int | None = None

    @property
    def exact(self) -> bool:
        return self.factory == FLAT

    def describe(self) -> str:
        knobs = [f"nprobe {self.nprobe}" if self.nprobe else "",
                 f"efSearch {self.ef_search}" if self.ef_search else ""]
        settings = ", ".join([self.factory, *filter(None, knobs)])
        return f"index {self.name} ({settings}): {self.reason}"


def check_index(config: IndexConfig) -> None:
    """Refuse a value that names no index, in one line, before faiss is loaded; a factory
    string that looks right but faiss cannot build is refused when it is built."""
    value = config.index
    if value.lower() not in INDEX_NAMES and not (_FACTORY_CHARS.match(value)
                                                 and _FACTORY_START.match(value)):
        raise InputError(f"--index {value!r}: expected {', '.join(INDEX_NAMES)} or a faiss "
                         "factory string such as IVF1024,Flat")
    for option, number in (("--nprobe", config.nprobe), ("--ef-search", config.ef_search)):
        if number is not None and number < 1:
            raise InputError(f"{option} must be positive, got {number}")


def plan_index(config: IndexConfig, num_images: int, dim: int) -> IndexPlan:
    """The index for a gallery of `num_images` descriptors of `dim` dimensions."""
    check_index(config)
    name = config.index.lower()
    reason = f"asked for, {num_images:,} images"
    if name == AUTO:
        name, reason = _by_size(num_images, dim)
    if name not in INDEX_NAMES:
        return IndexPlan("factory", config.index, reason, config.nprobe, config.ef_search)
    _check_knobs(config, name)
    lists = inverted_lists(num_images)
    nprobe = config.nprobe or default_nprobe(lists)
    if name == "flat":
        return IndexPlan(name, FLAT, reason)
    if name == "hnsw":
        return IndexPlan(name, f"HNSW{HNSW_LINKS},Flat", reason,
                         ef_search=config.ef_search or DEFAULT_EF_SEARCH)
    if name == "ivf":
        return IndexPlan(name, f"IVF{lists},Flat", reason, nprobe=nprobe)
    return IndexPlan(name, f"IVF{lists},PQ{pq_subquantizers(dim)}x{pq_bits(num_images)}",
                     reason, nprobe=nprobe)


def _check_knobs(config: IndexConfig, name: str) -> None:
    """A knob the index does not have is refused, not ignored."""
    for option, number, kinds in (("--nprobe", config.nprobe, ("ivf", "ivfpq")),
                                  ("--ef-search", config.ef_search, ("hnsw",))):
        if number is not None and name not in kinds:
            raise InputError(f"{option} applies to index {' or '.join(kinds)}, not {name}")


def _by_size(num_images: int, dim: int) -> tuple[str, str]:
    if num_images <= EXACT_LIMIT:
        return "flat", f"auto, {num_images:,} images (exact up to {EXACT_LIMIT:,})"
    if num_images < COMPRESSED_LIMIT:
        return "ivf", (f"auto, {num_images:,} images (approximate above {EXACT_LIMIT:,}; "
                       f"--index flat for exact)")
    gigabytes = num_images * dim * 4 / 1e9
    return "ivfpq", (f"auto, {num_images:,} images (compressed from {COMPRESSED_LIMIT:,}: "
                     f"uncompressed they take {gigabytes:.0f} GB)")


def inverted_lists(num_images: int) -> int:
    """IVF lists: the power of two nearest √N (k-means stays cheap on a CPU; faiss' guideline
    4√N..16√N trades a longer training for faster searches), at least 39 training vectors
    per list as faiss' k-means asks."""
    nearest = 2 ** round(math.log2(max(num_images, 1)) / 2)
    return max(1, min(nearest, num_images // 39))


def default_nprobe(lists: int) -> int:
    """Lists searched by default: 16 of 1,024 at 1M images, twice the 8 that already found
    the exact top 100 on benchmarks/shortlist_scale.py's mixture (BENCHMARKS.md, "Approximate
    shortlists"): a margin for real descriptors, whose neighbourhoods are less tidy."""
    return min(lists, max(MIN_NPROBE, round(lists * PROBED_FRACTION)))


def pq_bits(num_images: int) -> int:
    """Bits per PQ code: 8 (256 centroids per sub-quantiser), fewer where the gallery is too
    small to train 256 (faiss' k-means wants 39 vectors per centroid)."""
    return max(1, min(8, int(math.log2(max(num_images, 2) / 39))))


def pq_subquantizers(dim: int) -> int:
    """PQ sub-quantisers: one per PQ_SUBVECTOR_DIM dimensions, a divisor of `dim` as PQ needs."""
    wanted = max(1, dim // PQ_SUBVECTOR_DIM)
    return min((m for m in range(1, dim + 1) if dim % m == 0), key=lambda m: abs(m - wanted))
