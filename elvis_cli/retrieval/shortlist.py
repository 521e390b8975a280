"""Global k-NN shortlists with faiss: inner product over L2-normalised descriptors (cosine).

`build_shortlist` searches arrays with the exact flat index (reproducible: no training, no
approximation). `store_shortlist` searches a features file's gallery with the index
`IndexConfig` names (index_choice.py): exact for small galleries, so their shortlists stay
what they always were, approximate and saved beside the features for large ones
(saved_index.py); descriptors are read in chunks there, never whole at float32 twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from elvis_cli.retrieval.index_choice import IndexConfig, plan_index
from elvis_cli.util.atomic import atomic_path, writable_output
from elvis_cli.util.errors import InputError
from elvis_cli.util.file_kind import FileKind, describe_file, file_kind
from elvis_cli.util.safe_pickle import load_pickle

if TYPE_CHECKING:
    import faiss

    from elvis_cli.features.store import DescriptorStore
    from elvis_cli.retrieval.saved_index import GalleryIndex
    from elvis_cli.util.progress import ProgressCallback


@dataclass
class Shortlist:
    indices: np.ndarray  # (Q, K) int64 gallery rows, most similar first; -1 pads short lists
    similarities: np.ndarray  # (Q, K) float32 global similarities; -inf where padded
    # (Q, K) rows in a gallery file holding only shortlisted images (3-row nn files), or None
    file_rows: np.ndarray | None = None

    @property
    def length(self) -> int:
        return self.indices.shape[1]


def build_shortlist(
    queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False
) -> Shortlist:
    """Top-k gallery rows per query; with exclude_self, query i never lists gallery row i."""
    import faiss

    _check_dims(queries, gallery.shape[1])
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return search_shortlist(index, [queries], k, exclude_self)


def search_shortlist(index: faiss.Index, queries: Iterable[np.ndarray], k: int,
                     exclude_self: bool = False) -> Shortlist:
    """Top-k rows of `index` for each query of the chunks `queries` (in order); with
    exclude_self, the i-th query never lists row i. Rows an approximate index did not find
    are -1 (similarity -inf)."""
    if k <= 0:
        raise InputError(f"shortlist size must be positive, got {k}")
    available = index.ntotal - (1 if exclude_self else 0)
    k = min(k, available)
    search_k = min(k + 1, index.ntotal) if exclude_self else k
    found, start = [], 0
    for chunk in queries:
        _check_dims(chunk, index.d)
        if available <= 0 or not len(chunk):
            continue
        similarities, indices = index.search(np.ascontiguousarray(chunk, dtype=np.float32),
                                             search_k)
        if exclude_self:
            similarities, indices = _drop_self(similarities, indices, k, start)
        similarities[indices < 0] = -np.inf
        found.append((indices.astype(np.int64), similarities.astype(np.float32)))
        start += len(chunk)
    if not found:
        raise InputError("shortlist needs at least one query and one other gallery image")
    return Shortlist(*(np.concatenate(part) for part in zip(*found, strict=True)))


def _check_dims(queries: np.ndarray, dim: int) -> None:
    if queries.shape[1] != dim:
        raise InputError(f"query and gallery global descriptors differ in size: "
                         f"{queries.shape[1]} vs {dim}")


def _drop_self(similarities: np.ndarray, indices: np.ndarray, k: int, first: int = 0):
    """Remove each query's own row, `first` + its position (or the last entry when it was not
    retrieved)."""
    rows = first + np.arange(indices.shape[0])[:, None]
    is_self = indices == rows
    keep_last = ~is_self.any(axis=1)
    is_self[keep_last, -1] = True
    keep = ~is_self
    return (similarities[keep].reshape(-1, k), indices[keep].reshape(-1, k))


def store_shortlist(queries: DescriptorStore, gallery: DescriptorStore, same: bool, k: int,
                    global_type: str = "cls", config: IndexConfig | None = None,
                    progress: ProgressCallback | None = None
                    ) -> tuple[Shortlist, GalleryIndex]:
    """The top-k gallery images of every query (`same`: one file, each image excluded from
    its own list) by the index `config` names, and that index; an approximate one is read
    from beside the gallery's features where it was saved, else built and saved there."""
    import faiss

    from elvis_cli.retrieval.faiss_index import CHUNK_ROWS, configure_search
    from elvis_cli.retrieval.saved_index import gallery_index

    plan = plan_index(config or IndexConfig(), gallery.num_images, gallery.global_dim or 0)
    found = gallery_index(gallery, plan, global_type, progress)
    found.plan = configure_search(found.index, plan, k)
    if plan.exact:  # the queries at once, as build_shortlist searches (the same results);
        # one file's queries are the index's own vectors, not a second copy
        vectors = (faiss.rev_swig_ptr(found.index.get_xb(), found.index.ntotal * found.index.d)
                   .reshape(found.index.ntotal, found.index.d) if same
                   else queries.global_descriptors(global_type))
        return search_shortlist(found.index, [vectors], k, same), found
    return search_shortlist(found.index, queries.global_chunks(global_type, CHUNK_ROWS), k,
                            same), found


SHORTLIST_SUFFIXES = (".npz",)


def save_shortlist(path: Path, shortlist: Shortlist) -> None:
    """Write `.npz` (ours), atomically; with its file rows when it has them (3-row nn)."""
    path = writable_output(path, SHORTLIST_SUFFIXES)
    rows = {} if shortlist.file_rows is None else {"file_rows": shortlist.file_rows}
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, indices=shortlist.indices, similarities=shortlist.similarities, **rows)


def load_shortlist(path: Path) -> Shortlist:
    """Read ours (.npz) or the official `nn_<desc>.pkl` (a (2|3, Q, K) tensor, ELVIS_SPEC §4)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise InputError(f"shortlist file not found: {path}")
    kind = file_kind(path)  # by content: a features file given here is named as one
    if kind not in (FileKind.NPZ, FileKind.PICKLE, FileKind.UNKNOWN):
        raise InputError(f"{path} is {describe_file(path)}, not a shortlist: expected a .npz "
                         "written by `elvis shortlist` or an official nn_<desc>.pkl")
    if kind is FileKind.NPZ:
        try:
            with np.load(path, allow_pickle=False) as data:
                rows = data["file_rows"].astype(np.int64) if "file_rows" in data else None
                return Shortlist(data["indices"].astype(np.int64),
                                 data["similarities"].astype(np.float32), rows)
        except (KeyError, ValueError, OSError) as error:
            raise InputError(f"{path} is not a shortlist file: {error}") from None
    table = load_pickle(path)
    if isinstance(table, torch.Tensor):
        table = table.numpy()
    table = np.asarray(table)
    if table.ndim != 3 or table.shape[0] not in (2, 3):
        raise InputError(f"{path}: expected a (2, Q, K) or (3, Q, K) array, got {table.shape}")
    if not np.isfinite(table[1:]).all():
        raise InputError(f"{path}: gallery indices must be finite numbers")
    file_rows = table[2].astype(np.int64) if table.shape[0] == 3 else None
    return Shortlist(table[1].astype(np.int64), table[0].astype(np.float32), file_rows)
