"""Run `elvis` in a child process that kills (SIGKILL) or parks itself at a chosen moment.

    python -m tests.kill_runner POINT NTH ACTION [elvis arguments...]

POINT names a moment of extraction or re-ranking, NTH picks its n-th occurrence, ACTION is
`kill` (SIGKILL ourselves, as `kill -9` or the OOM killer would) or `pause` (write
`$ELVIS_PAUSED`, then sleep until killed). The library is not modified: the hooks wrap real
functions from outside.
"""

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py

from elvis_cli.backbones.efficientnet_lite import EfficientNetLiteBackbone
from elvis_cli.cli import app as cli
from elvis_cli.features import extraction as extract
from elvis_cli.model import elvis as elvis_model


def _destination_is(test: Callable[[str], bool]) -> Callable[..., bool]:
    return lambda source, destination, *rest, **options: test(Path(destination).name)


def _is_shard(name: str) -> bool:
    return name.startswith("shard-")


def _is_output(name: str) -> bool:
    return name.endswith(".h5") and not _is_shard(name)


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".npz")


def _is_virtual(*args: Any, dcpl: Any = None, **options: Any) -> bool:
    """Whether a low-level dataset creation makes a virtual dataset (the joined file's)."""
    return dcpl is not None and dcpl.get_layout() == h5py.h5d.VIRTUAL


# point: (owner, attribute, which calls count, stop before (False) or after (True) the call)
POINTS: dict[str, tuple[Any, str, Callable[..., bool], bool]] = {
    "decode": (extract, "decode_image", lambda *a, **k: True, False),
    "model": (EfficientNetLiteBackbone, "forward", lambda *a, **k: True, False),
    "shard-write": (h5py.Group, "create_dataset", lambda *a, **k: True, False),
    "shard-rename": (os, "replace", _destination_is(_is_shard), False),
    "shard-renamed": (os, "replace", _destination_is(_is_shard), True),
    "manifest": (os, "replace", _destination_is(lambda name: name == "manifest.json"), False),
    "finalize-write": (h5py.h5d, "create", _is_virtual, False),
    "finalize-rename": (os, "replace", _destination_is(_is_output), False),
    "finished": (os, "replace", _destination_is(_is_output), True),
    # re-ranking: ELViS scoring a pair (one call per pair on CPU), a part renamed into place
    "pair": (elvis_model, "sinkhorn_votes", lambda *a, **k: True, False),
    "part-renamed": (os, "replace", _destination_is(_is_part), True),
}


def _stop(action: str) -> None:
    if action == "pause":
        Path(os.environ["ELVIS_PAUSED"]).write_text(str(os.getpid()))
        while True:
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, nth: int, action: str) -> None:
    owner, attribute, counts, after = POINTS[point]
    original = getattr(owner, attribute)
    seen = 0
    guard = threading.Lock()

    def hooked(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        with guard:
            hit = counts(*args, **kwargs) and (seen := seen + 1) == nth
        if hit and not after:
            _stop(action)
        result = original(*args, **kwargs)
        if hit:
            _stop(action)
        return result

    setattr(owner, attribute, hooked)


if __name__ == "__main__":
    point, nth, action, *arguments = sys.argv[1:]
    install(point, int(nth), action)
    sys.argv = ["elvis", *arguments]
    cli.main()
