"""A gallery made of two features files, base first, without extracting either again.

+1M galleries are a benchmark's gallery and a million distractors (ELVIS_SPEC §4: the authors
join them with HDF5 virtual datasets). `join_features` builds such a file over two of ours:
each dataset maps the base's rows, then the distractors'. The two files are recorded as its
sources (size and SHA-256, as shards are), so `elvis verify` names a base that changed since
the join, and caches keyed by the joined file's identity see every change of a join.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from elvis_cli.features.layout import FEATURES_SUFFIXES
from elvis_cli.features.store import FeatureStore
from elvis_cli.features.writer import finalize
from elvis_cli.util.atomic import writable_output
from elvis_cli.util.errors import InputError


@dataclass
class JoinReport:
    output: Path
    num_base: int  # rows 0..num_base-1 are the base's
    num_added: int  # the rest are the added file's, in its order


def join_features(base: str | Path, added: str | Path, output: str | Path) -> JoinReport:
    """Write `output` over `base`'s rows, then `added`'s (virtual datasets, nothing copied).

    Both must be files of elvis extract with the same backbone settings and global
    descriptors, and lie in `output`'s folder or below it (a features file reads only files
    there). Images of both are stored relative to the common folder of their two roots."""
    output = writable_output(output, FEATURES_SUFFIXES)
    sources = [Path(base), Path(added)]
    if any(source.resolve() == output.resolve() for source in sources):
        raise InputError(f"the joined file {output} must be a new file, not one of the two "
                         "joined")
    folder = output.parent.resolve()
    outside = [source for source in sources if not source.resolve().is_relative_to(folder)]
    if outside:
        raise InputError(f"{outside[0]} is not in {output}'s folder {folder} or below it, so "
                         "the joined file could not read it: write the joined file higher up")
    with FeatureStore.open(sources[0]) as first, FeatureStore.open(sources[1]) as second:
        for store in (first, second):
            if store.backbone_settings is None:
                raise InputError(f"{store.path} was not written by elvis extract: only its "
                                 "files can be joined")
        _check_alike(first, second)
        counts = first.num_images, second.num_images
        settings = first.backbone_settings
        root = Path(os.path.commonpath([first.root, second.root]))
        paths = [os.path.relpath(store.root / path, root)
                 for store in (first, second) for path in store.paths]
    finalize(output, sources, settings, root, paths=paths)
    return JoinReport(output, *counts)


def _check_alike(base: FeatureStore, added: FeatureStore) -> None:
    """Refuse two files whose rows do not mean the same, naming what differs."""
    what = {
        "backbone settings": (base.backbone_settings, added.backbone_settings),
        "global descriptors": (base.global_types, added.global_types),
        "local descriptors per image": (base.num_local, added.num_local),
    }
    for name, (mine, theirs) in what.items():
        if mine != theirs:
            raise InputError(f"{added.path} differs from {base.path} in its {name} ({theirs} vs "
                             f"{mine}): extract it as the base was extracted")
