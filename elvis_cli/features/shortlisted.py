"""Local descriptors of only the gallery images some query will re-rank (+1M, the authors' way).

Re-ranking reads the locals of the images in each query's head, nothing else: with a million
distractors that is tens of thousands of images. `extract_shortlisted` extracts those images
of a gallery listing, in the authors' row order (head.py), and writes the shortlist again as
a 3-row nn file (ELVIS_SPEC §4) beside the output, which `elvis rerank --candidates` reads as
it reads the authors' (released.py's ShortlistedGallery). The global similarities stay the
shortlist's, made from the full gallery's global descriptors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from elvis_cli.features.extraction import ExtractConfig, ExtractReport, extract_features
from elvis_cli.features.head import head_file_rows, head_images
from elvis_cli.features.images import collect_images
from elvis_cli.retrieval.shortlist import Shortlist, load_shortlist, save_shortlist
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback

if TYPE_CHECKING:
    from elvis_cli.util.ray_cluster import RayExecutor

NN_SUFFIX = ".nn.npz"


@dataclass
class ShortlistedReport:
    extraction: ExtractReport
    shortlist: Path  # the 3-row shortlist to re-rank the output with
    head: int  # each query's top `head` is held: re-rank at most that many
    num_gallery: int  # images the gallery listing holds


def shortlisted_nn_path(output: str | Path) -> Path:
    """Where the 3-row shortlist of a shortlisted-only output goes: beside it."""
    return Path(output).with_suffix(NN_SUFFIX)


def extract_shortlisted(
    source: str | Path | Sequence[str | Path], shortlist: str | Path, output: str | Path,
    config: ExtractConfig | None = None, head: int | None = None,
    progress: ProgressCallback | None = None, force: bool = False,
    executor: RayExecutor | None = None,
) -> ShortlistedReport:
    """Extract the images of the gallery listing `source` that are in the top `head` (default:
    all) of some list of `shortlist`, into `output`, and write the shortlist with their rows
    to shortlisted_nn_path(output).

    `source` must list the gallery as it was listed when the features the shortlist was built
    from were extracted (gallery index i is its i-th image). Re-running resumes, as extract;
    with `executor`, the shards are Ray tasks, as extract's."""
    ranking = load_shortlist(Path(shortlist))
    head = ranking.length if head is None else head
    if not 1 <= head <= ranking.length:
        raise InputError(f"--head must be 1..{ranking.length} (the shortlist's length), "
                         f"got {head}")
    root, paths = collect_images(source)
    largest = int(ranking.indices.max(initial=-1))
    if largest >= len(paths):
        raise InputError(f"{shortlist} names gallery image {largest}, but the images given "
                         f"list {len(paths)}: give the gallery's images as they were extracted")
    held = head_images(ranking.indices, head)
    report = extract_features([paths[index] for index in held], output, config,
                              progress=progress, root=root, force=force, executor=executor)
    if report.failures:
        name, reason = report.failures[0]
        raise InputError(f"{len(report.failures)} shortlisted images could not be extracted "
                         f"({name}: {reason}), so {report.output.name}'s rows do not follow the "
                         "shortlist: fix or remove them, shortlist again and re-run")
    nn_path = shortlisted_nn_path(report.output)
    save_shortlist(nn_path, Shortlist(ranking.indices, ranking.similarities,
                                      head_file_rows(ranking.indices, held)))
    return ShortlistedReport(report, nn_path, head, len(paths))
