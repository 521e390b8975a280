"""Embeddings kept between runs, so that an image's ELViS work is done once per checkpoint.

Per image, the engine projects the descriptors and computes their dustbin gains; for a
gallery with about one shortlisted pair per image this costs as much as scoring the pair. A
gallery that is re-ranked again and again (new queries, other fusion settings) can keep
these embeddings: one folder per features file, model weights, descriptors per image and
precision, under a root the user chooses. Each run that embeds new images adds one HDF5
part, written atomically, so a killed run loses only its own part; a part that cannot be read
is reported and skipped, and its images are embedded again.
"""

import hashlib
import json
import uuid
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from elvis_cli.errors import DiskFullError, ElvisWarning
from elvis_cli.feature_store import HDF5_ERRORS, FeatureStore, new_hdf5

FORMAT = "elvis-cli-embeddings/1"


class EmbeddingCache:
    """The cached embeddings of one features file under one model; rows are image indices."""

    def __init__(self, root: Path, store: FeatureStore, model: nn.Module, num_local: int,
                 dtype: torch.dtype) -> None:
        self.folder = Path(root) / _key(store, model, num_local, dtype)
        self._num_local, self._dtype = num_local, dtype
        self._writable = True
        self._where: dict[int, tuple[Path, int]] = {}  # row -> (part, position in it)
        for part in sorted(self.folder.glob("part-*.h5")):
            try:
                rows = self._check(part)
            except (*HDF5_ERRORS, AssertionError) as error:
                warnings.warn(f"{part}: unreadable embedding cache part, ignored "
                              f"({error or 'unexpected layout'})", ElvisWarning, stacklevel=2)
                continue
            self._where.update((int(row), (part, position)) for position, row in enumerate(rows))

    def holds(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` are cached (boolean mask)."""
        return np.array([int(row) in self._where for row in rows], dtype=bool)

    def load(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Descriptors (n, K, d), gains (n, K) and padding (n, K) of cached `rows`, in order."""
        places = [self._where[int(row)] for row in rows]
        parts: dict[Path, list[int]] = {}
        for slot, (part, _) in enumerate(places):
            parts.setdefault(part, []).append(slot)
        arrays: list[np.ndarray | None] = [None, None, None]
        for part, slots in parts.items():
            positions = np.array([places[slot][1] for slot in slots])
            order = np.argsort(positions)  # h5py reads increasing positions only
            with h5py.File(part, "r") as file:
                for index, name in enumerate(("descriptors", "gains", "padding")):
                    values = file[name][positions[order]]
                    if arrays[index] is None:
                        arrays[index] = np.empty((len(rows), *values.shape[1:]), values.dtype)
                    arrays[index][np.array(slots)[order]] = values
        descriptors, gains, padding = arrays
        return torch.from_numpy(descriptors), torch.from_numpy(gains), padding

    def add(self, rows: np.ndarray, descriptors: torch.Tensor, gains: torch.Tensor,
            padding: np.ndarray) -> None:
        """Keep the embeddings of `rows` (new to the cache) in a new part."""
        if not len(rows) or not self._writable:
            return
        part = self.folder / f"part-{uuid.uuid4().hex}.h5"
        try:
            with new_hdf5(part) as file:
                file.attrs["format"] = FORMAT
                file.create_dataset("rows", data=np.asarray(rows, dtype=np.int64))
                file.create_dataset("descriptors", data=descriptors.cpu().numpy())
                file.create_dataset("gains", data=gains.cpu().numpy())
                file.create_dataset("padding", data=np.asarray(padding, dtype=bool))
        except (OSError, DiskFullError) as error:  # a cache must not stop the job
            self._writable = False
            warnings.warn(f"embedding cache {self.folder} not written, embeddings are not kept "
                          f"({error})", ElvisWarning, stacklevel=2)
            return
        self._where.update((int(row), (part, position)) for position, row in enumerate(rows))

    def _check(self, part: Path) -> np.ndarray:
        """The rows a part holds, after checking that its arrays fit together and this cache."""
        with h5py.File(part, "r") as file:
            rows = file["rows"][()]
            shapes = [file[name].shape for name in ("descriptors", "gains", "padding")]
            assert file.attrs.get("format") == FORMAT and rows.ndim == 1
            assert shapes[0][:2] == shapes[1] == shapes[2] == (len(rows), self._num_local)
            assert file["descriptors"].dtype == np.dtype(str(self._dtype).split(".")[-1])
        return rows


def _key(store: FeatureStore, model: nn.Module, num_local: int, dtype: torch.dtype) -> str:
    """Digest of everything the embeddings depend on: the features file (FeatureStore.identity),
    the model's class and weights, K and the precision."""
    digest = hashlib.sha256()
    identity = {**store.identity(), "model": type(model).__name__, "num_local": num_local,
                "dtype": str(dtype)}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]
