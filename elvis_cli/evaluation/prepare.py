"""Getting a benchmark onto disk in the layout datasets.py reads, and saying how far along it is.

`prepare` fetches what the registry names (resumable, checksummed), or takes the same files
from an archive or folder the user already has (`source`), then unpacks image archives. What it
cannot fetch it names, with the URL and the place to put it, in one error.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from elvis_cli.evaluation.datasets import (
    CLASS_FILES,
    GLDV2_SOLUTION,
    RetrievalDataset,
    default_data_root,
    detect_layout,
    find_datasets,
    load_dataset,
)
from elvis_cli.evaluation.registry import (
    LAYOUT_CLASS,
    LAYOUT_GLDV2,
    LAYOUT_PICKLE,
    REGISTRY,
    RENAMED,
    DatasetEntry,
    Remote,
)
from elvis_cli.features.images import IMAGE_SUFFIXES
from elvis_cli.features.layout import OFFICIAL_LOCAL, official_file, official_parts
from elvis_cli.util.atomic import write_text_atomic
from elvis_cli.util.download import UnreachableError, fetch
from elvis_cli.util.errors import InputError, OfflineError
from elvis_cli.util.progress import ProgressCallback, TaskProgress

MANIFEST = ".elvis-prepared.json"  # what was fetched (sha256) and unpacked, per file name
_DISTRACTORS_LIST = "revisitop1m.txt"
_ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".zip")


@dataclass
class PrepareReport:
    name: str
    folder: Path
    fetched: list[str] = field(default_factory=list)
    unpacked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class DatasetStatus:
    name: str
    state: str  # ready, images only, ground truth only, missing, bundled
    features: list[str]  # backbones with extracted features; "<desc> (released)" files
    size_bytes: int
    detail: str = ""

    @property
    def metric(self) -> str:
        """The registry's headline metric of the dataset; "custom" for one it does not know."""
        entry = REGISTRY.get(self.name)
        return entry.metric if entry else "custom"


def _entry(name: str, data_root: Path) -> DatasetEntry:
    entry = REGISTRY.get(name)
    if name in RENAMED:
        raise InputError(f"dataset {name!r} is now called {RENAMED[name]!r} (the authors' name)")
    if entry is None and detect_layout(Path(data_root) / name) is not None:
        listing = " ".join(["elvis", "datasets", "list", *_data_root_option(data_root)])
        raise InputError(f"{name} is a custom dataset ({Path(data_root) / name}), which elvis "
                         f"cannot fetch: `{listing}` says what it lacks; elvis prepares only "
                         f"{', '.join(REGISTRY)}")
    if entry is None:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)}")
    return entry


def prepare(name: str, data_root: Path, source: Path | None = None,
            on_file=None) -> PrepareReport:
    """Lay out dataset `name` under `data_root/name`; `on_file(label)` hears each step."""
    entry = _entry(name, data_root)
    step = on_file or (lambda _label: None)
    folder = Path(data_root) / name
    report = PrepareReport(name, folder)
    if entry.base is not None:
        if (folder / f"gnd_{name}.pkl").is_file():
            return report  # the authors' own folder of the +1M set
        for needed in (entry.base, str(entry.distractors)):
            if needed not in find_datasets(data_root) and not (
                    Path(data_root) / needed / _DISTRACTORS_LIST).is_file():
                raise InputError(f"{name} is {entry.base} plus R1M distractors: run "
                                 f"`{prepare_command(needed, data_root)}` first, or put the "
                                 f"authors' {name}/ folder under {data_root}")
        return report
    if entry.bundled is not None:
        shutil.copytree(entry.bundled, folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("features"))
        report.fetched.append(str(entry.bundled))
        return report
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(folder)
    if source is not None:
        with _opened(Path(source), folder) as files:
            _take_from(files, entry, folder, report)
    missing = [remote for remote in entry.remotes if not _present(remote, folder, manifest)]
    reason = "the files were not in --from"
    if source is None:
        missing, reason = _download(missing, folder, manifest, report, step)
    if missing:
        raise OfflineError(_what_to_fetch(entry, data_root, missing, reason))
    for remote in entry.remotes:
        if remote.unpack_to and not manifest.get(remote.filename, {}).get("unpacked"):
            step(f"unpacking {remote.filename}")
            _unpack(folder / remote.filename, folder / remote.unpack_to, remote.flatten)
            (folder / remote.filename).unlink()
            manifest.setdefault(remote.filename, {})["unpacked"] = True
            report.unpacked.append(remote.filename)
            _write_manifest(folder, manifest)
    if entry.layout != "distractors" and detect_layout(folder) is None:
        raise InputError(_ground_truth_hint(entry, data_root))
    report.warnings = _check(entry, data_root)
    return report


def prepare_dataset(name: str, data_root: Path | None = None, source: Path | None = None,
                    progress: ProgressCallback | None = None) -> PrepareReport:
    """`elvis datasets prepare`: `prepare` under the data root (None: `$ELVIS_DATA_ROOT`, else
    the default cache); `progress` hears each step as a "preparing NAME" task (total unknown,
    the step in `detail`)."""
    data_root = Path(data_root) if data_root is not None else default_data_root()
    steps = 0

    def on_file(label: str) -> None:
        nonlocal steps
        if progress:
            progress(TaskProgress(f"preparing {name}", steps, 0, label))
        steps += 1

    return prepare(name, data_root, source, on_file=on_file)


def _present(remote: Remote, folder: Path, manifest: dict) -> bool:
    return (folder / remote.filename).is_file() or bool(
        manifest.get(remote.filename, {}).get("unpacked"))


def _download(missing: list[Remote], folder: Path, manifest: dict, report: PrepareReport,
              step) -> tuple[list[Remote], str]:
    """Fetch each missing file; returns those that could not be fetched and the first reason.

    Once the network has failed, the rest are not attempted: each would fail the same way.
    """
    for position, remote in enumerate(missing):
        step(f"downloading {remote.url}")
        try:
            digest = fetch(remote.url, folder / remote.filename, remote.sha256)
        except UnreachableError as error:  # the URL is in the list of files to fetch
            return missing[position:], error.reason
        except OfflineError as error:
            return missing[position:], str(error)
        manifest[remote.filename] = {"sha256": digest, "url": remote.url}
        _write_manifest(folder, manifest)
        report.fetched.append(remote.filename)
    return [], ""


def prepare_command(name: str, data_root: Path, source: str = "") -> str:
    """The `elvis datasets prepare` command to suggest, carrying the data root unless it is
    the default one (and `--from SOURCE` when given), so that it can be run as it is."""
    words = ["elvis", "datasets", "prepare", name, *_data_root_option(data_root)]
    if source:
        words += ["--from", source]
    return " ".join(words)


def _data_root_option(data_root: Path) -> list[str]:
    """`--data-root DIR` for a suggested command; nothing when DIR is the default."""
    if Path(data_root) == default_data_root():
        return []
    return ["--data-root", shlex.quote(str(data_root))]


def _ground_truth_files(entry: DatasetEntry) -> list[str]:
    """The ground-truth files of the entry's layout, as `datasets.py` reads them."""
    return {LAYOUT_PICKLE: [f"gnd_{entry.name}.pkl"],
            LAYOUT_CLASS: [name for pair in CLASS_FILES for name in pair],
            LAYOUT_GLDV2: ["index.csv", GLDV2_SOLUTION, f"gnd_{entry.name}.pkl"],
            "distractors": [_DISTRACTORS_LIST]}[entry.layout]


def _image_folders(entry: DatasetEntry) -> tuple[str, ...]:
    return ("index", "test") if entry.layout == LAYOUT_GLDV2 else ("jpg",)


def _ground_truth_hint(entry: DatasetEntry, data_root: Path) -> str:
    """One line for a dataset whose ground truth elvis cannot fetch or build itself."""
    where = {LAYOUT_PICKLE: f"gnd_{entry.name}.pkl and jpg/",
             LAYOUT_CLASS: "gallery.txt (+ queries.txt) of `path,class` lines and jpg/",
             LAYOUT_GLDV2: f"index.csv, {GLDV2_SOLUTION}, index/ and test/"}[entry.layout]
    source = f" ({entry.homepage})" if entry.homepage else ""
    return (f"{entry.name}: elvis cannot fetch its ground truth ({entry.unverified or 'no URL'})"
            f"; get it from its authors{source} and run "
            f"`{prepare_command(entry.name, data_root, 'PATH')}` with a folder or archive "
            f"holding {where}")


def _what_to_fetch(entry: DatasetEntry, data_root: Path, missing: list[Remote],
                   reason: str) -> str:
    """One line: every file to fetch by hand, its URL, and where it goes."""
    folder = Path(data_root) / entry.name
    shown = missing[:6]
    files = "; ".join(f"{remote.url} -> {folder / remote.filename}" for remote in shown)
    more = f"; and {len(missing) - len(shown)} more like them" if len(missing) > len(shown) else ""
    return (f"cannot download {len(missing)} file(s) of {entry.name} ({reason}); "
            f"fetch them by hand: {files}{more}; then run "
            f"`{prepare_command(entry.name, data_root)}` again, or "
            f"`{prepare_command(entry.name, data_root, 'DIR')}` with a folder or archive "
            "holding them")


@contextmanager
def _opened(source: Path, folder: Path) -> Iterator[Path]:
    """A folder to search: `source` itself, or a staging copy of a file (an expected download
    as it is, any other archive unpacked) that is removed afterwards."""
    if source.is_dir():
        yield source
        return
    if not source.is_file():
        raise InputError(f"--from {source}: no such file or folder")
    expected = {remote.filename for entry in REGISTRY.values() for remote in entry.remotes}
    staging = Path(tempfile.mkdtemp(prefix=".from-", dir=folder))
    try:
        if source.name in expected or not source.name.endswith(_ARCHIVE_SUFFIXES):
            shutil.copy2(source, staging / source.name)
        else:
            _unpack(source, staging, flatten=False, images_only=False)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _take_from(files: Path, entry: DatasetEntry, folder: Path, report: PrepareReport) -> None:
    """Copy the expected files (found anywhere under `files`) and any laid-out ground truth
    and image folders into the dataset folder."""
    by_name: dict[str, Path] = {}
    for path in files.rglob("*"):
        if path.is_file():
            by_name.setdefault(path.name, path)
    wanted = list(dict.fromkeys([*(remote.filename for remote in entry.remotes),
                                 *_ground_truth_files(entry)]))
    for filename in wanted:
        if filename in by_name and not (folder / filename).is_file():
            shutil.copy2(by_name[filename], folder / filename)
            report.fetched.append(filename)
    subs = _image_folders(entry)
    for sub in subs:
        found = next((path for path in [files / sub, *files.rglob(sub)] if path.is_dir()), None)
        if found is not None:
            shutil.copytree(found, folder / sub, dirs_exist_ok=True)
            report.fetched.append(f"{sub}/")
    if not report.fetched:
        folders = " or ".join(f"{sub}/" for sub in subs)
        raise InputError(f"--from {files}: found none of the files of {entry.name} "
                         f"({', '.join(wanted)}) nor a {folders} folder")


def _unpack(archive: Path, target: Path, flatten: bool, images_only: bool = True) -> None:
    """Extract regular files by content, never by the archive's paths, so a hostile member
    name (absolute, `..`) cannot land outside `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for name, read in _members(archive):
        parts = [part for part in Path(name).parts if part not in ("", ".", "..", "/")]
        if not parts or (images_only and Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES):
            continue
        destination = target / (parts[-1] if flatten else Path(*parts))
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(read())


def _members(archive: Path):
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    if not info.is_dir():
                        yield info.filename, lambda info=info: bundle.read(info)
            return
        with tarfile.open(archive) as bundle:
            for member in bundle:
                if member.isfile():
                    yield member.name, lambda member=member: bundle.extractfile(member).read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise InputError(f"{archive}: not a readable tar or zip archive ({error})") from None


def _check(entry: DatasetEntry, data_root: Path) -> list[str]:
    """Warnings about a prepared dataset: images that are missing, counts that differ."""
    if entry.layout == "distractors":
        return []
    dataset = load_dataset(data_root, entry.name)
    warnings = []
    absent = _absent_images(dataset)
    if absent:
        warnings.append(f"{len(absent)} image(s) missing, first {absent[0]}")
    for what, expected, actual in (("queries", entry.num_queries, len(dataset.queries)),
                                   ("gallery images", entry.num_gallery, len(dataset.gallery))):
        if expected is not None and expected != actual:
            warnings.append(f"{actual} {what}, the benchmark has {expected}")
    return warnings


def _absent_images(dataset: RetrievalDataset) -> list[Path]:
    """The images its ground truth names that are not on disk, each once (a class-labelled
    set without queries.txt lists its gallery as its queries too)."""
    paths = dict.fromkeys(dataset.gallery_paths() + dataset.query_paths())
    return [path for path in paths if not path.is_file()]


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_manifest(folder: Path, manifest: dict) -> None:
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def dataset_status(data_root: Path, name: str) -> DatasetStatus:
    """Ready (ground truth and every image), images only, ground truth only, or missing."""
    entry = REGISTRY.get(name)
    if entry is not None and entry.base is not None:  # +1M: its own folder, or both parts
        ready = name in find_datasets(data_root)
        return DatasetStatus(name, "ready" if ready else "missing",
                             feature_sets(Path(data_root) / name), 0,
                             "" if ready else f"{prepare_command(entry.base, data_root)}; "
                             f"{prepare_command(str(entry.distractors), data_root)}")
    folder = Path(data_root) / name
    features = feature_sets(folder)
    size = _size(folder)
    # a custom dataset cannot be prepared: say what to put where instead
    prepare_hint = prepare_command(name, data_root) if entry is not None else (
        f"put its ground truth in {folder}: gnd_{name}.pkl with jpg/, gallery.txt of "
        f"`path,class` lines with jpg/, or GLDv2's index.csv and {GLDV2_SOLUTION}")
    if not folder.is_dir():
        if entry is not None and entry.bundled is not None:
            return DatasetStatus(name, "bundled", features, 0, f"{prepare_hint}, or use it "
                                 f"where it is: --data-root {entry.bundled.parent}")
        return DatasetStatus(name, "missing", features, size, prepare_hint)
    if entry is not None and entry.layout == "distractors":
        state = "ready" if (folder / _DISTRACTORS_LIST).is_file() else "images only"
        return DatasetStatus(name, state, features, size)
    if detect_layout(folder) is None:
        has_images = any((folder / sub).is_dir() for sub in ("jpg", "index", "test"))
        return DatasetStatus(name, "images only" if has_images else "missing", features, size,
                             prepare_hint)
    try:
        dataset = load_dataset(data_root, name)
    except InputError as error:
        return DatasetStatus(name, "broken", features, size, str(error))
    absent = _absent_images(dataset)
    if absent:
        where = prepare_hint if entry is not None else (
            f"put the images its ground truth names under {dataset.image_root}/")
        return DatasetStatus(name, "ground truth only", features, size,
                             f"{len(absent)} image(s) missing, first {absent[0]}; {where}")
    return DatasetStatus(name, "ready", features, size)


def list_datasets(data_root: Path | None = None) -> list[DatasetStatus]:
    """`elvis datasets list`: every registry entry, then every custom dataset found under the
    data root (None: `$ELVIS_DATA_ROOT`, else the default cache)."""
    data_root = Path(data_root) if data_root is not None else default_data_root()
    names = list(REGISTRY) + [name for name in find_datasets(data_root) if name not in REGISTRY]
    return [dataset_status(data_root, name) for name in names]


def feature_sets(folder: Path) -> list[str]:
    """Backbones with both query and gallery features cached under `features/`, and released
    descriptor files (`<desc>_query_local.hdf5` beside `<desc>_gallery_local.hdf5`)."""
    names = []
    cache = folder / "features"
    if cache.is_dir():
        for sub in sorted(cache.iterdir()):
            if (sub / "query.h5").is_file() and (sub / "gallery.h5").is_file():
                names.append(sub.name.rsplit("-", 1)[0])
    if folder.is_dir():
        for query in sorted(folder.glob(official_file("", "*", "query", OFFICIAL_LOCAL).name)):
            desc = official_parts(query)[0]
            if official_file(folder, desc, "gallery", OFFICIAL_LOCAL).is_file():
                names.append(f"{desc} (released)")
    return sorted(set(names), key=names.index)


def _size(folder: Path) -> int:
    total = 0
    stack = [folder]
    while stack:
        try:
            entries = list(Path(stack.pop()).iterdir())
        except OSError:
            continue
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                stack.append(path)
            elif path.is_file():
                total += path.stat().st_size
    return total
