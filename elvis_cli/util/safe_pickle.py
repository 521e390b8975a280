"""Load the pickles that retrieval benchmarks ship (ground truth, shortlists) without running code.

A pickle can name any importable callable and call it while loading, so a downloaded
`gnd_*.pkl` or `nn_*.pkl` could run a command. The unpickler here resolves only the few
names needed for plain containers, numpy arrays and torch tensors, and refuses the rest
before anything is called.
"""

from __future__ import annotations

import codecs
import copyreg
import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from elvis_cli.util.errors import InputError

# Pickles written by Python 2 or by numpy < 2 name modules that have moved since.
_MODULE_ALIASES = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
}

_BUILTINS = {
    "set": set,
    "frozenset": frozenset,
    "complex": complex,
    "slice": slice,
    "bytes": bytes,
    "bytearray": bytearray,
    "list": list,
    "dict": dict,
    "tuple": tuple,
}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use to carry raw bytes.

    Only the latin-1 round trip is needed; other codecs are refused so the call cannot be
    used to reach arbitrary codec machinery.
    """
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return text.encode("latin-1")


def _numpy_reconstructor(cls: type, base: type, state: Any) -> Any:
    """`copyreg._reconstructor`, limited to numpy types (its only legitimate use here)."""
    if not (isinstance(cls, type) and issubclass(cls, (np.ndarray, np.generic, np.dtype))):
        raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return copyreg._reconstructor(cls, base, state)


def _torch_storage_from_bytes(data: bytes) -> Any:
    """Replacement for `torch.storage._load_from_bytes`, which calls torch.load unrestricted.

    torch's own weights-only loader accepts storages and tensors and nothing executable.
    """
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_names() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric

    return {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
    }


def _torch_names() -> dict[tuple[str, str], Any]:
    import torch
    import torch._utils

    return {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _torch_storage_from_bytes,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        module = _MODULE_ALIASES.get(module, module)
        allowed = self._lookup(module, name)
        if allowed is None:
            raise InputError(
                f"refusing to load {self._path}: it asks to build {module}.{name}, "
                "which is not allowed"
            )
        return allowed

    @staticmethod
    def _lookup(module: str, name: str) -> Any:
        if module == "builtins":
            return _BUILTINS.get(name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) == ("copyreg", "_reconstructor"):
            return _numpy_reconstructor
        if module.startswith("numpy"):
            return _numpy_names().get((module, name))
        if module.startswith("torch"):
            return _torch_names().get((module, name))
        return None


def load_pickle(path: Path | str) -> Any:
    """Unpickle `path`, allowing only containers, numpy arrays/scalars and torch tensors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cannot read {path}: no such file")
    try:
        with path.open("rb") as handle:
            return _RestrictedUnpickler(handle, path).load()
    except InputError:
        raise
    except Exception as exc:  # any decoding failure means the file is not a usable pickle
        raise InputError(f"cannot read {path}: not a valid pickle ({exc})") from exc
