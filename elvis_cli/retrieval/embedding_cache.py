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
import time
import uuid
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from elvis_cli.features.store import HDF5_ERRORS, FeatureStore
from elvis_cli.features.writer import new_hdf5
from elvis_cli.model.reranker import Embedded
from elvis_cli.util.errors import DiskFullError, ElvisWarning

FORMAT = "elvis-cli-embeddings/1"
DATASETS = ("descriptors", "gains", "padding")
# per image: descriptors (n, K, d), gains (n, K) and padding (n, K)
Embeddings = tuple[torch.Tensor, torch.Tensor, np.ndarray]


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
            except HDF5_ERRORS as error:
                warnings.warn(f"{part}: unreadable embedding cache part, ignored ({error})",
                              ElvisWarning, stacklevel=2)
                continue
            self._where.update((int(row), (part, position)) for position, row in enumerate(rows))

    def holds(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` are cached (boolean mask)."""
        return np.array([int(row) in self._where for row in rows], dtype=bool)

    def load(self, rows: np.ndarray) -> tuple[np.ndarray, Embeddings | None, np.ndarray]:
        """The cached `rows` (sorted) that could be read, their (descriptors (n, K, d), gains
        (n, K), padding (n, K)) in that order, and the rows of parts found damaged on reading
        (HDF5 checks every image's checksum), which the cache forgets."""
        places = [self._where.get(int(row)) for row in rows]
        damaged = [slot for slot, place in enumerate(places) if place is None]  # forgotten
        parts: dict[Path, list[int]] = {}
        for slot, place in enumerate(places):
            if place is not None:
                parts.setdefault(place[0], []).append(slot)
        read: list[tuple[list[int], list[np.ndarray]]] = []
        for part, slots in parts.items():
            positions = np.array([places[slot][1] for slot in slots])
            order = np.argsort(positions)  # h5py reads increasing positions only
            try:
                with h5py.File(part, "r") as file:
                    values = [file[name][positions[order]] for name in DATASETS]
            except HDF5_ERRORS as error:
                warnings.warn(f"{part}: damaged embedding cache part, its images are embedded "
                              f"again ({error})", ElvisWarning, stacklevel=2)
                self._where = {row: place for row, place in self._where.items()
                               if place[0] != part}
                damaged += slots
                continue
            read.append(([slots[i] for i in order], values))
        good = sorted(slot for slots, _ in read for slot in slots)
        if not good:
            return rows[:0], None, rows[damaged]
        at = {slot: index for index, slot in enumerate(good)}
        arrays = [np.empty((len(good), *values.shape[1:]), values.dtype)
                  for values in read[0][1]]
        for slots, values in read:
            targets = [at[slot] for slot in slots]
            for array, value in zip(arrays, values, strict=True):
                array[targets] = value
        return rows[good], (torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1]),
                            arrays[2]), np.sort(rows[damaged])

    def add(self, rows: np.ndarray, embedded: Embedded) -> None:
        """Keep the embeddings of `rows` (new to the cache) in a new part."""
        if not len(rows) or not self._writable:
            return
        descriptors, gains, padding = embedded.descriptors, embedded.gains, embedded.mask.cpu()
        # named in time order, so that a later part wins for an image two runs both embedded
        part = self.folder / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        try:
            with new_hdf5(part) as file:
                file.attrs["format"] = FORMAT
                file.create_dataset("rows", data=np.asarray(rows, dtype=np.int64))
                for name, values in zip(DATASETS, (descriptors.cpu().numpy(),
                                                   gains.cpu().numpy(),
                                                   padding.numpy().astype(bool)), strict=True):
                    # one chunk per image, with its checksum: reads verify what they load
                    file.create_dataset(name, data=values, chunks=(1, *values.shape[1:]),
                                        fletcher32=True)
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
            shapes = [file[name].shape for name in DATASETS]
            fits = (file.attrs.get("format") == FORMAT and rows.ndim == 1
                    and shapes[0][:2] == shapes[1] == shapes[2] == (len(rows), self._num_local)
                    and file["descriptors"].dtype == np.dtype(str(self._dtype).split(".")[-1]))
        if not fits:
            raise ValueError("unexpected layout")
        return rows


def _key(store: FeatureStore, model: nn.Module, num_local: int, dtype: torch.dtype) -> str:
    """Digest of everything the embeddings depend on: the features file (FeatureStore.identity),
    the model's class and weights, K and the precision."""
    digest = hashlib.sha256()
    identity = {**store.identity(), "model": type(model).__name__, "num_local": num_local,
                "dtype": str(dtype)}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    update_with_weights(digest, model)
    return digest.hexdigest()[:24]


def update_with_weights(digest: "hashlib._Hash", model: nn.Module) -> None:
    """Feed `model`'s weights, by name, to `digest`: what keys results to the model."""
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
