"""Building a faiss index from descriptors that arrive in chunks, and setting its search knobs.

A gallery of millions never exists whole at float32 here: one pass draws the training sample
(IVF's k-means, PQ's codebooks), a second adds the chunks. The sample is drawn with a fixed
seed, so the same descriptors always give the same index.
"""

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from elvis_cli.retrieval.index_choice import IndexPlan, default_nprobe
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback, track

CHUNK_ROWS = 65_536  # vectors read and added at a time
TRAINING_PER_LIST = 50  # training vectors per IVF list (faiss' k-means wants at least 39)
MIN_TRAINING = 65_536  # ... and at least this many, for PQ's codebooks
SAMPLE_SEED = 0

Chunks = Callable[[], Iterator[np.ndarray]]  # a fresh pass over the vectors, in order


def new_index(plan: IndexPlan, dim: int):
    """The empty inner-product index of `plan`; a factory string faiss cannot build is an
    InputError naming it."""
    import faiss

    try:
        return faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        reason = str(error).strip().rsplit("Error: ", 1)[-1]
        raise InputError(f"--index {plan.factory!r}: faiss cannot build it for {dim}-d "
                         f"descriptors ({reason})") from None


def build_index(plan: IndexPlan, chunks: Chunks, num_vectors: int, dim: int,
                progress: ProgressCallback | None = None):
    """The index of `plan` over the `num_vectors` vectors that `chunks` yields (CHUNK_ROWS at a
    time), trained on a seeded sample where it needs training; `progress` hears each chunk
    added ("indexing")."""
    index = new_index(plan, dim)
    _skip_polysemous_training(index)
    if not index.is_trained:
        index.train(_training_sample(chunks, num_vectors, _training_size(index, num_vectors)))
    advance = track(progress, "indexing", -(-num_vectors // CHUNK_ROWS))
    for chunk in chunks():
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
        advance()
    return index


def _skip_polysemous_training(index) -> None:
    """faiss trains IVFPQ's codes for polysemous (Hamming) filtering by default, which
    shortlists never use and which takes minutes where the PQ itself takes seconds."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        faiss.downcast_index(ivf).do_polysemous_training = False


def _training_size(index, num_vectors: int) -> int:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    lists = ivf.nlist if ivf is not None else 0
    return min(num_vectors, max(TRAINING_PER_LIST * lists, MIN_TRAINING))


def _training_sample(chunks: Chunks, num_vectors: int, size: int) -> np.ndarray:
    """`size` vectors drawn without replacement, seeded, in their order."""
    rows = np.sort(np.random.default_rng(SAMPLE_SEED).choice(num_vectors, size, replace=False))
    picked, start = [], 0
    for chunk in chunks():
        stop = start + len(chunk)
        wanted = rows[(rows >= start) & (rows < stop)] - start
        picked.append(np.asarray(chunk[wanted], dtype=np.float32))
        start = stop
    return np.ascontiguousarray(np.concatenate(picked))


def configure_search(index, plan: IndexPlan, k: int) -> IndexPlan:
    """Set the plan's nprobe and efSearch on `index` (efSearch at least `k`, which HNSW needs
    to return k results), the IVF default where a factory string named none; returns the plan
    with the values in force."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    nprobe = plan.nprobe or (default_nprobe(ivf.nlist) if ivf is not None else None)
    ef_search = max(plan.ef_search, k) if plan.ef_search else None
    space = faiss.ParameterSpace()
    for option, name, value in (("--nprobe", "nprobe", nprobe),
                                ("--ef-search", "efSearch", ef_search)):
        if value is not None:
            try:
                space.set_index_parameter(index, name, value)
            except RuntimeError:
                raise InputError(f"{option}: index {plan.factory} has no {name}") from None
    return replace(plan, nprobe=nprobe, ef_search=ef_search)
