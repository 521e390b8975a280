"""Retrieval benchmarks on disk, in the ground-truth layouts the benchmarks ship with.

- revisitop pickle `<root>/gnd_<name>.pkl` (easy/hard/junk, or ok/junk) plus `<root>/jpg/`;
- class-labelled lines `<root>/gallery.txt` (+ optional `queries.txt`) of `path,class,...`;
- GLDv2 `<root>/index.csv` + `retrieval_solution_v2.1.csv` (public/private) with the official
  `index/a/b/c/<id>.jpg` and `test/a/b/c/<id>.jpg` image folders.

The ground truth is the source of truth for names, order and positives; images are only
located, never listed from disk. Every layout becomes per-query index lists, so one set of
metrics serves them all.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elvis_cli.evaluation.registry import (
    LAYOUT_CLASS,
    LAYOUT_GLDV2,
    LAYOUT_PICKLE,
    REGISTRY,
    RENAMED,
)
from elvis_cli.features.images import IMAGE_SUFFIXES
from elvis_cli.util.download import cache_dir
from elvis_cli.util.errors import InputError
from elvis_cli.util.safe_pickle import load_pickle

GLDV2_SOLUTION = "retrieval_solution_v2.1.csv"

# Index lists of each kind of pickled ground truth; the first that matches decides the kind.
_KIND_KEYS = {"revisitop": ("easy", "hard", "junk"), "ok-junk": ("ok", "junk")}

Box = tuple[float, float, float, float]


@dataclass
class RetrievalDataset:
    """A benchmark as its ground truth describes it; indices in `ground_truth` point into
    `gallery`.

    `ground_truth_kind` says what the ground truth holds, whatever file it came from (the
    registry's `layout`): "revisitop" (easy/hard/junk, scored by the Medium and Hard protocols),
    "ok-junk" (ok/junk), "class" (class labels, the query's own row as junk) or "gldv2" (ok/junk
    with public and private query splits); see metrics.PROTOCOLS.
    """

    name: str
    root: Path
    gallery: list[str]
    queries: list[str]
    ground_truth: list[dict[str, np.ndarray]]
    ground_truth_kind: str  # "revisitop", "ok-junk", "class" or "gldv2"
    images_dir: Path | None = None  # where names resolve; None: <root>/jpg
    distractor_dir: Path | None = None  # the last `num_distractors` gallery names live here
    num_distractors: int = 0
    splits: dict[str, np.ndarray] = field(default_factory=dict)  # named query subsets (GLDv2)
    map_k: int | None = 100  # cut-off of mAP@k for ok/junk ground truth
    unlocated: str = ""  # why some gallery images cannot be located (then gallery_paths fails)

    @property
    def image_root(self) -> Path:
        return self.images_dir or self.root / "jpg"

    def _image_path(self, folder: Path, entry: str) -> Path:
        # revisitop lists bare names ("all_souls_000013"); INSTRE-style lists carry the suffix.
        if Path(entry).suffix.lower() in IMAGE_SUFFIXES:
            return folder / entry
        return folder / f"{entry}.jpg"

    def gallery_paths(self) -> list[Path]:
        if self.unlocated:
            raise InputError(self.unlocated)
        own = len(self.gallery) - self.num_distractors
        return [self._image_path(self.image_root if index < own else self.distractor_dir, entry)
                for index, entry in enumerate(self.gallery)]

    def query_paths(self) -> list[Path]:
        return [self._image_path(self.image_root, entry) for entry in self.queries]

    def query_boxes(self) -> list[Box | None]:
        """The crop (x1, y1, x2, y2) each query is evaluated with, or None for the full image."""
        boxes: list[Box | None] = []
        for entry in self.ground_truth:
            bbx = entry.get("bbx")
            boxes.append(None if bbx is None else tuple(float(v) for v in bbx))  # type: ignore[misc]
        return boxes


def default_data_root() -> Path:
    """$ELVIS_DATA_ROOT, else `<cache>/data` where cache is $ELVIS_CACHE or ~/.cache/elvis."""
    if os.environ.get("ELVIS_DATA_ROOT"):
        return Path(os.environ["ELVIS_DATA_ROOT"]).expanduser()
    return cache_dir() / "data"


def detect_layout(folder: Path) -> str | None:
    """Which ground-truth layout `folder` holds, or None."""
    if (folder / f"gnd_{folder.name}.pkl").is_file():
        return LAYOUT_PICKLE
    if _class_files(folder) is not None:
        return LAYOUT_CLASS
    if (folder / GLDV2_SOLUTION).is_file() and (folder / "index.csv").is_file():
        return LAYOUT_GLDV2
    return None


def find_datasets(data_root: Path) -> list[str]:
    """Names of the benchmarks under `data_root`: folders with ground truth in a known layout,
    plus the +R1M sets whose base set and distractors are both there."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        return []
    found = {child.name for child in data_root.iterdir()
             if child.is_dir() and detect_layout(child) is not None}
    found |= {entry.name for entry in REGISTRY.values()
              if entry.base in found and (data_root / str(entry.distractors)
                                          / "revisitop1m.txt").is_file()}
    return sorted(found)


def _how_to_get(name: str) -> str:
    if name in REGISTRY:
        return f"run `elvis datasets prepare {name}`"
    return ("expected <data-root>/<name>/ with gnd_<name>.pkl and jpg/, gallery.txt, "
            "or GLDv2's index.csv and " + GLDV2_SOLUTION)


def _names(raw: dict[str, Any], key: str, gnd_file: Path) -> list[str]:
    if key not in raw:
        raise InputError(f"{gnd_file} has no '{key}' list")
    return [str(entry) for entry in raw[key]]


def _indices(value: Any, where: str, gallery_size: int) -> np.ndarray:
    indices = np.asarray(value, dtype=np.int64).reshape(-1)
    bad = indices[(indices < 0) | (indices >= gallery_size)]
    if bad.size:
        raise InputError(
            f"{where} refers to gallery image {int(bad[0])}, but the gallery has "
            f"{gallery_size} images"
        )
    return indices


def _kind_of(entries: list[Any], gnd_file: Path) -> str:
    first = entries[0] if entries else {}
    if not isinstance(first, dict):
        raise InputError(f"{gnd_file}: 'gnd' must be a list of dicts, one per query")
    for kind, keys in _KIND_KEYS.items():
        if keys[0] in first:
            return kind
    raise InputError(f"{gnd_file}: query 0 has neither 'easy' (revisitop) nor 'ok' (ok/junk) lists")


def _parse_ground_truth(
    entries: list[Any], kind: str, gallery_size: int, gnd_file: Path
) -> list[dict[str, np.ndarray]]:
    parsed = []
    for q, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{gnd_file}: 'gnd' must be a list of dicts, one per query")
        item: dict[str, np.ndarray] = {}
        for key in _KIND_KEYS[kind]:
            if key not in entry:
                raise InputError(f"{gnd_file}: query {q} has no '{key}' list")
            item[key] = _indices(entry[key], f"{gnd_file}: query {q} '{key}'", gallery_size)
        if entry.get("bbx") is not None:
            bbx = np.asarray(entry["bbx"], dtype=np.float64).reshape(-1)
            if bbx.size != 4:
                raise InputError(f"{gnd_file}: query {q} 'bbx' must be x1, y1, x2, y2")
            item["bbx"] = bbx
        parsed.append(item)
    return parsed


def load_dataset(data_root: Path, name: str) -> RetrievalDataset:
    """Read the ground truth of `<data_root>/<name>` and check every index against the gallery.

    A +1M set (roxford5k+1m, rparis6k+1m) is always rooted in its own folder, where its
    released files are; its ground truth is its own `gnd_<name>.pkl` there, or, for the image
    route, its base set's; the R1M distractor images are appended when their list is there.
    """
    if name in RENAMED:
        raise InputError(f"dataset {name!r} is now called {RENAMED[name]!r} (the authors' "
                         f"name): rename its folder under {data_root} to match")
    entry = REGISTRY.get(name)
    root = Path(data_root) / name
    if entry is not None and entry.base is not None:
        return _with_distractors(data_root, entry.name, entry.base, str(entry.distractors))
    if not root.is_dir():
        raise InputError(f"no dataset '{name}' in {data_root}: {_how_to_get(name)}")
    layout = detect_layout(root)
    if layout == LAYOUT_CLASS:
        dataset = _load_class_lines(root)
    elif layout == LAYOUT_GLDV2:
        dataset = _load_gldv2(root)
    elif layout == LAYOUT_PICKLE:
        dataset = _load_pickle(root)
    else:
        raise InputError(f"{root} has no gnd_{name}.pkl: {_how_to_get(name)}")
    if entry is not None and entry.private_queries and dataset.ground_truth_kind == "ok-junk":
        _split_private(dataset, entry.private_queries)
    if entry is not None and dataset.ground_truth_kind == "ok-junk":
        dataset.map_k = entry.map_k
    return dataset


def _split_private(dataset: RetrievalDataset, private: int) -> None:
    """GLDv2-test as the authors ship it (gnd_gldv2-test.pkl, ok/junk): the last `private`
    queries are the private split, the others the public one (their compute_metrics)."""
    count = len(dataset.queries)
    first_private = max(count - private, 0)
    dataset.ground_truth_kind = "gldv2"
    dataset.splits = {"public": np.arange(first_private),
                      "private": np.arange(first_private, count)}


def _load_pickle(root: Path) -> RetrievalDataset:
    gnd_file = root / f"gnd_{root.name}.pkl"
    raw = load_pickle(gnd_file)
    if not isinstance(raw, dict):
        raise InputError(f"{gnd_file} must hold a dict with 'imlist', 'qimlist' and 'gnd'")
    gallery = _names(raw, "imlist", gnd_file)
    queries = _names(raw, "qimlist", gnd_file)
    if "gnd" not in raw:
        raise InputError(f"{gnd_file} has no 'gnd' list")
    entries = list(raw["gnd"])
    if len(entries) != len(queries):
        raise InputError(f"{gnd_file}: 'gnd' has {len(entries)} entries for {len(queries)} queries")
    kind = _kind_of(entries, gnd_file)
    ground_truth = _parse_ground_truth(entries, kind, len(gallery), gnd_file)
    return RetrievalDataset(root.name, root, gallery, queries, ground_truth, kind)


def read_image_lines(path: Path) -> list[list[str]]:
    """The fields of each `path,...` line, one image a line in row order (the authors'
    test_query.txt / test_gallery.txt: `path,class,...` for class-labelled sets, the last two
    fields may be width,height); blank lines and `#` comments are skipped."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [part.strip() for part in line.split(",")]
        if not fields[0]:
            raise InputError(f"{path}:{number}: expected `path,...`, got {line.strip()!r}")
        rows.append(fields)
    if not rows:
        raise InputError(f"{path} lists no images")
    return rows


def _read_class_lines(path: Path) -> list[tuple[str, str]]:
    """(path, class) of each `path,class,...` line; a `path,class` header is skipped; an empty
    class marks an image of no class."""
    rows = read_image_lines(path)
    if rows[0][:2] == ["path", "class"]:
        rows = rows[1:]
    short = next((fields for fields in rows if len(fields) < 2), None)
    if short is not None or not rows:
        raise InputError(f"{path}: expected `path,class,...` lines, got "
                         f"{','.join(short) if short else 'only a header'!r}")
    return [(fields[0], fields[1]) for fields in rows]


# (gallery, queries) of class-labelled sets: ours, then the authors' folder layout
CLASS_FILES = (("gallery.txt", "queries.txt"), ("test_gallery.txt", "test_query.txt"))


def _class_files(root: Path) -> tuple[Path, Path | None] | None:
    """The gallery list and the query list (None: the gallery's images are the queries)."""
    for gallery, queries in CLASS_FILES:
        if (root / gallery).is_file():
            return root / gallery, root / queries if (root / queries).is_file() else None
    return None


def _load_class_lines(root: Path) -> RetrievalDataset:
    """Positives are the other gallery images of the query's class; a query that is itself in
    the gallery has its own row as junk, so it is taken out of its ranking (SOP, RP2K)."""
    gallery_file, query_file = _class_files(root)  # type: ignore[misc]  # detect_layout found it
    gallery = _read_class_lines(gallery_file)
    queries = _read_class_lines(query_file) if query_file is not None else gallery
    members: dict[str, list[int]] = {}
    row_of: dict[str, int] = {}
    for index, (path, label) in enumerate(gallery):
        if path in row_of:
            raise InputError(f"{gallery_file} lists {path} twice")
        row_of[path] = index
        if label:
            members.setdefault(label, []).append(index)
    ground_truth = []
    for path, label in queries:
        own = row_of.get(path)
        same = np.asarray(members.get(label, []) if label else [], dtype=np.int64)
        junk = np.asarray([] if own is None else [own], dtype=np.int64)
        ground_truth.append({"ok": same[same != own] if own is not None else same,
                             "junk": junk})
    return RetrievalDataset(root.name, root, [path for path, _ in gallery],
                            [path for path, _ in queries], ground_truth, "class", map_k=None)


def _gldv2_path(split: str, image_id: str) -> str:
    return f"{split}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _load_gldv2(root: Path) -> RetrievalDataset:
    """Queries with ground truth, public first then private, so the private split is the last
    block (ELVIS_SPEC §6); `Ignored` rows have no landmark and are left out."""
    with open(root / "index.csv", newline="", encoding="utf-8") as handle:
        index_ids = [row["id"] for row in csv.DictReader(handle)]
    row_of = {image_id: row for row, image_id in enumerate(index_ids)}
    by_usage: dict[str, list[tuple[str, np.ndarray]]] = {"Public": [], "Private": []}
    solution = root / GLDV2_SOLUTION
    with open(solution, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("Usage") not in by_usage:
                continue
            unknown = [image for image in row["images"].split() if image not in row_of]
            if unknown:
                raise InputError(f"{solution}: query {row['id']} lists {unknown[0]}, "
                                 "which index.csv does not")
            positives = np.asarray([row_of[image] for image in row["images"].split()], np.int64)
            by_usage[row["Usage"]].append((row["id"], positives))
    ordered = by_usage["Public"] + by_usage["Private"]
    if not ordered:
        raise InputError(f"{solution} has no Public or Private query")
    public = len(by_usage["Public"])
    return RetrievalDataset(
        root.name, root, [_gldv2_path("index", image) for image in index_ids],
        [_gldv2_path("test", image) for image, _ in ordered],
        [{"ok": positives, "junk": np.empty(0, np.int64)} for _, positives in ordered],
        "gldv2", images_dir=root,
        splits={"public": np.arange(public), "private": np.arange(public, len(ordered))})


def _with_distractors(data_root: Path, name: str, base: str, distractors: str
                      ) -> RetrievalDataset:
    """A +1M set, rooted in `<data_root>/<name>` whatever its ground truth comes from, so that
    released files are never read from the base set's folder."""
    root, listing = Path(data_root) / name, Path(data_root) / distractors / "revisitop1m.txt"
    base_root = Path(data_root) / base
    if (root / f"gnd_{name}.pkl").is_file():
        dataset = _load_pickle(root)
    elif listing.is_file():
        dataset = load_dataset(data_root, base)
    else:
        raise InputError(f"{name} needs its own folder {root} with gnd_{name}.pkl (the "
                         f"authors' release), or {base} and the R1M distractors ({listing} is "
                         f"missing; run `elvis datasets prepare {distractors}`)")
    dataset.name, dataset.root = name, root
    dataset.images_dir = dataset.images_dir or base_root / "jpg"
    if not listing.is_file():
        dataset.unlocated = (f"{name}: the images of its 1M distractors are not listed "
                             f"({listing} is missing; run `elvis datasets prepare "
                             f"{distractors}`)")
        return dataset
    names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    dataset.gallery = dataset.gallery + names
    dataset.distractor_dir, dataset.num_distractors = listing.parent / "jpg", len(names)
    return dataset
