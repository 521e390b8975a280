"""Global k-NN shortlists: exact inner-product search with faiss.

Global descriptors are L2-normalised, so inner product is cosine similarity; an exact flat
index keeps results reproducible (no training, no approximation).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from elvis_cli.util.atomic import atomic_path, writable_output
from elvis_cli.util.errors import InputError
from elvis_cli.util.file_kind import FileKind, describe_file, file_kind
from elvis_cli.util.safe_pickle import load_pickle


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

    if k <= 0:
        raise InputError(f"shortlist size must be positive, got {k}")
    if queries.shape[1] != gallery.shape[1]:
        raise InputError(
            f"query and gallery global descriptors differ in size: "
            f"{queries.shape[1]} vs {gallery.shape[1]}"
        )
    available = gallery.shape[0] - (1 if exclude_self else 0)
    if available <= 0 or queries.shape[0] == 0:
        raise InputError("shortlist needs at least one query and one other gallery image")
    k = min(k, available)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    search_k = min(k + 1, gallery.shape[0]) if exclude_self else k
    similarities, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), search_k)
    if exclude_self:
        similarities, indices = _drop_self(similarities, indices, k)
    return Shortlist(indices.astype(np.int64), similarities.astype(np.float32))


def _drop_self(similarities: np.ndarray, indices: np.ndarray, k: int):
    """Remove each query's own row (or the last entry when it was not retrieved)."""
    rows = np.arange(indices.shape[0])[:, None]
    is_self = indices == rows
    keep_last = ~is_self.any(axis=1)
    is_self[keep_last, -1] = True
    keep = ~is_self
    return (similarities[keep].reshape(-1, k), indices[keep].reshape(-1, k))


SHORTLIST_SUFFIXES = (".npz",)


def save_shortlist(path: Path, shortlist: Shortlist) -> None:
    """Write `.npz` (ours), atomically."""
    path = writable_output(path, SHORTLIST_SUFFIXES)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, indices=shortlist.indices, similarities=shortlist.similarities)


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
                return Shortlist(data["indices"].astype(np.int64),
                                 data["similarities"].astype(np.float32))
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
