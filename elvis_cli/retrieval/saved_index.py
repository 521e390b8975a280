"""A gallery's approximate index, saved beside its features file and reused by later runs.

`FILE.h5.index/<global type>-<factory>.faiss` holds the index, `<same>.json` what it was built
from: the features' identity (FeatureStore.identity: for our files the shards' checksums and
the rows the joined file maps, for others size and modification time), the size and
modification time of the file the global descriptors come from where that is another one
(the authors' files beside theirs), the global type, the factory string, count and
dimension. A run whose features and settings match reads the index; features re-extracted
or another index build it again. The search knobs (nprobe, efSearch) are set at each search,
so changing them never rebuilds. Both files are written atomically, the index first, and the
record keeps the index file's size: a crash between the two, or a damaged index, means a
rebuild, never a wrong index. The exact flat index is the vectors themselves: it is built in
memory each run and never saved.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elvis_cli.retrieval.faiss_index import CHUNK_ROWS, build_index
from elvis_cli.retrieval.index_choice import IndexPlan
from elvis_cli.util.atomic import atomic_path, write_text_atomic
from elvis_cli.util.errors import DiskFullError
from elvis_cli.util.progress import ProgressCallback

if TYPE_CHECKING:
    import faiss

    from elvis_cli.features.store import DescriptorStore

FORMAT = "elvis-index-1"
INDEX_SUFFIX = ".index"  # the folder beside the features file: FILE.h5.index


@dataclass
class GalleryIndex:
    """A gallery's index and where it came from."""

    index: faiss.Index
    plan: IndexPlan
    path: Path | None  # the saved index; None: held in memory only
    built: bool  # built by this run (False: read from `path`)
    seconds: float  # to build or read it
    not_saved: str = ""  # why a built index could not be saved, if it could not

    def describe(self) -> str:
        """One line: which index, why, and whether it was built, read or not saved."""
        line = self.plan.describe()
        if self.path is not None:
            verb = "built" if self.built else "read"
            line += f"; {verb} in {self.seconds:.1f} s, {self.path}"
        elif self.not_saved:
            line += f"; built in {self.seconds:.1f} s, not saved ({self.not_saved})"
        return line


def index_folder(features: Path) -> Path:
    return features.with_name(features.name + INDEX_SUFFIX)


def gallery_index(store: DescriptorStore, plan: IndexPlan, global_type: str,
                  progress: ProgressCallback | None = None) -> GalleryIndex:
    """The index of `plan` over the `global_type` descriptors of `store`: read from beside the
    features where a matching one was saved, else built from chunks and saved there (where
    the folder takes it: a read-only gallery is indexed in memory); `progress` hears a build."""
    started = time.perf_counter()
    dim = int(store.global_dim or 0)

    def build() -> faiss.Index:
        return build_index(plan, lambda: store.global_chunks(global_type, CHUNK_ROWS),
                           store.num_images, dim, progress)

    if plan.exact:
        index = build()
        return GalleryIndex(index, plan, None, True, time.perf_counter() - started)
    path = index_folder(store.path) / f"{global_type}-{_file_name(plan.factory)}.faiss"
    record = _record(store, plan, global_type, dim)
    index = _read_matching(path, record)
    if index is not None:
        return GalleryIndex(index, plan, path, False, time.perf_counter() - started)
    index = build()
    seconds = time.perf_counter() - started
    try:
        _save(path, index, record)
    except (OSError, DiskFullError) as error:
        return GalleryIndex(index, plan, None, True, seconds,
                            getattr(error, "strerror", None) or str(error))
    return GalleryIndex(index, plan, path, True, seconds)


def _file_name(factory: str) -> str:
    """The factory string as a file name: IVF1024,Flat -> IVF1024_Flat."""
    return re.sub(r"[^A-Za-z0-9.=+-]", "_", factory)


def _record(store: DescriptorStore, plan: IndexPlan, global_type: str, dim: int
            ) -> dict[str, Any]:
    """What the index depends on (see the module's docstring)."""
    globals_file = store.global_file(global_type)
    source: dict[str, Any] = {}
    if globals_file.resolve() != store.path.resolve():
        stat = globals_file.stat()
        source = {"file": str(globals_file.resolve()), "bytes": stat.st_size,
                  "modified": stat.st_mtime_ns}
    return {"format": FORMAT, "features": store.identity(), "globals": source,
            "global_type": global_type, "factory": plan.factory,
            "count": store.num_images, "dim": dim}


def _read_matching(path: Path, record: dict[str, Any]) -> faiss.Index | None:
    """The saved index at `path` if its record is `record` and its file is whole; else None."""
    import faiss

    try:
        saved = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or saved.pop("bytes", None) != path.stat().st_size:
            return None
    except (OSError, ValueError):
        return None
    if saved != json.loads(json.dumps(record)):  # as JSON keeps it (tuples become lists)
        return None
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        return None


def _save(path: Path, index: faiss.Index, record: dict[str, Any]) -> None:
    import faiss

    with atomic_path(path) as temporary:
        faiss.write_index(index, str(temporary))
    write_text_atomic(path.with_suffix(".json"),
                      json.dumps({**record, "bytes": path.stat().st_size}, indent=1))
