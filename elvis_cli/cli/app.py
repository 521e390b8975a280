"""The `elvis` command: parses options, makes one library call per command (the same call a
notebook makes: `from elvis_cli import rerank_files`), and prints what it returns.

Progress reaches the CLI only as the library's events (`TaskProgress`), drawn by `_Progress`.
Defaults left unset here are the library's own (the config dataclasses, the presets); `--help`
shows them. A list option takes its values space- or comma-separated after it, or repeated:
`--shortlist 0 25 50`, `--shortlist 0,25,50` and `--shortlist 0 --shortlist 25,50` are one.

Exit codes: 0 success; 1 the command could not do its job (a one-line `elvis: error: ...` on
stderr); 2 bad command-line usage; 3 finished, but some inputs were skipped (each one named on
stderr); 4 the disk filled up (finished work is kept; re-run to resume); 130 interrupted.
"""

import atexit
import functools
import gc
import importlib
import inspect
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import typer.core
import typer.main
from rich.console import Console
from rich.table import Table
from rich.text import Text

from elvis_cli import (
    EXIT_PARTIAL,
    PRESETS,
    RERANKERS,
    ElvisError,
    ElvisWarning,
    InputError,
    TaskProgress,
    __version__,
    backbone_options,
    get_preset,
)


class _Group(typer.core.TyperGroup):
    """A group of commands whose `--help` shows flags as flags (see _flags_take_no_value)."""

    def format_help(self, ctx, formatter) -> None:
        _flags_take_no_value(self, ctx)
        return super().format_help(ctx, formatter)


def _flags_take_no_value(command: click.Command, ctx: click.Context) -> None:
    """typer's option panels show a flag's type as its value (`--quiet <bool>`); a flag takes
    none, and an empty metavar shows none."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False):
            param.metavar = ""


app = typer.Typer(
    cls=_Group,
    name="elvis",
    help="Batch ELViS re-ranking for instance-level image retrieval.\n\n"
    "Typical use: `elvis extract imgs/ -o feats.h5`, then `elvis rerank --shortlist 100`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console()
# Tables are written whole when the output is a file or a pipe, not cut to 80 columns.
wide_console = console if console.is_terminal else Console(width=1000)

# (command, option) -> (config dataclass, field): an option left unset takes that field's
# default, inside the library; `--help` looks it up there to show it
LIBRARY_DEFAULTS = {
    **{("extract", option): ("ExtractConfig", field) for option, field in (
        ("backbone", "backbone"), ("device", "device"), ("batch_size", "batch_size"),
        ("shard_size", "shard_size"))},
    **{("rerank", option): ("RerankConfig", field) for option, field in (
        ("shortlist_size", "shortlist"), ("use_local", "num_local"), ("device", "device"),
        ("batch_size", "batch_size"), ("precision", "precision"), ("block_size", "block_size"))},
    ("explain", "use_local"): ("RerankConfig", "num_local"),
    **{("search", option): ("RerankConfig", field) for option, field in (
        ("shortlist_size", "shortlist"), ("use_local", "num_local"), ("device", "device"))},
    **{("evaluate", option): ("EvaluateConfig", field) for option, field in (
        ("backbone", "backbone"), ("shortlist_sizes", "shortlists"), ("model", "models"),
        ("use_local", "num_local"), ("device", "device"), ("post", "post"),
        ("block_size", "block_size"))},
    **{("evaluate", option): ("FusionGrid", field) for option, field in (
        ("grid_shortlist", "shortlists"), ("grid_lam", "lams"), ("grid_temp", "temperatures"))},
    **{(command, option): ("PostConfig", option) for command in ("shortlist", "rerank", "evaluate")
       for option in ("aqe_n", "aqe_alpha", "gss_k", "gss_query_k", "gss_beta_percentile",
                      "gss_epochs", "gss_lr", "gss_seed", "gss_verifier",
                      "gss_verify_threshold")},
    **{("report", option): ("ReportConfig", field) for option, field in (
        ("top", "top_k"), ("per_page", "queries_per_page"), ("max_thumbnails", "max_thumbnails"),
        ("explain_top", "explain_top"))},
    **{("train", option): ("TrainConfig", field) for option, field in (
        ("model", "model"), ("backbone", "backbone"), ("rounds", "rounds"),
        ("steps", "steps_per_round"),
        ("views", "views_per_image"), ("batch_pairs", "batch_pairs"), ("lr", "lr"),
        ("seed", "seed"), ("device", "device"))},
}
MODEL_NAMES = ", ".join(RERANKERS)  # what --model takes, from the registry
# list options whose values may hold commas themselves (KEY=VALUE with JSON values)
NO_COMMA_SPLIT = {"backbone_option"}
# options that may be given without their value, and the value they then take
OPTIONAL_VALUES = {"--ray": "local"}


class _Command(typer.core.TyperCommand):
    """A command whose `--help` names where the default of an option left unset lives (the
    library's config field): naming it, not reading it, keeps `--help` from importing torch."""

    def format_help(self, ctx, formatter) -> None:
        for param in self.params:
            source = LIBRARY_DEFAULTS.get((self.name, param.name))
            if source is not None and param.default is None:
                param.show_default = "library: " + ".".join(source)
        _flags_take_no_value(self, ctx)
        return super().format_help(ctx, formatter)


def _config(name: str, constructor: str | None = None, *args: Any, **given: Any) -> Any:
    """Config dataclass `name` (a public name of elvis_cli) with the options that were given;
    the rest keep its defaults (or those of `constructor`, a classmethod taking `args`). Only
    that one is loaded, and no config's module imports torch (tests/test_startup.py): the
    argument errors it raises must not wait for heavy imports."""
    config_class = getattr(importlib.import_module("elvis_cli"), name)
    build = getattr(config_class, constructor) if constructor else config_class
    return build(*args, **{key: value for key, value in given.items()
                           if value is not None and value != []})


DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N].")]
EmbeddingCacheOption = Annotated[Path | None, typer.Option(
    help="Folder keeping ELViS embeddings of images between runs (per features file and "
         "checkpoint): a gallery re-ranked again is not embedded again. Needs about 0.5 KB per "
         "descriptor.")]
ExternalOption = Annotated[bool, typer.Option(
    "--allow-external-sources",
    help="Let features files read data from files outside their own folder (only for files "
         "you trust).")]
BackboneOptions = Annotated[
    list[str] | None,
    typer.Option("--backbone-option", help="Extra backbone setting KEY=VALUE (a list option; "
                                           "values are JSON where they parse as JSON)."),
]
PresetOption = Annotated[str | None, typer.Option(
    help=f"Named setting of backbone, detector and checkpoint: {', '.join(PRESETS)} "
         "(explicit options override it; see REPRODUCE.md).")]
FeaturesOption = Annotated[Path, typer.Option(
    help="Features file, all-vs-all (or --queries with --gallery).")]
FeaturesArgument = Annotated[Path, typer.Argument(
    metavar="FEATURES", help="Features file (.h5) from `elvis extract`.")]
QueriesOption = Annotated[Path | None, typer.Option(help="Query features (with --gallery).")]
GalleryOption = Annotated[Path | None, typer.Option(help="Gallery features (with --queries).")]
KeepLocalOption = Annotated[int | None, typer.Option(
    help="Local descriptors kept per image at extraction (the backbone's num_local; default "
         "the backbone's own).")]
UseLocalOption = Annotated[int | None, typer.Option(
    min=1, help="The first N stored local descriptors of each image used for re-ranking; "
                "default: the re-ranker's own (the paper's 600, or a bundled checkpoint's; sv "
                "on RootSIFT: all keypoints).")]
AsymmetricOption = Annotated[bool, typer.Option(
    "--asymmetric", help="Accept --queries extracted at a smaller image size than --gallery "
                         "(low-resolution queries); any other difference is still refused.")]
QueryImageSizeOption = Annotated[int | None, typer.Option(
    min=1, help="Extract the queries at this longer side (px), the gallery's other settings "
                "kept: low-resolution queries, cheaper to extract and re-rank; default: as "
                "the gallery.")]
PostOption = Annotated[str, typer.Option(
    help="Global post-processing before re-ranking: none, aqe (alpha query expansion), gss "
         "(guided similarity separation, a GCN trained on the gallery) or gss-v (gss on "
         "the k-NN edges a local re-ranker verifies).")]
AqeNOption = Annotated[int | None, typer.Option(min=1, help="aqe: neighbours added per query.")]
AqeAlphaOption = Annotated[float | None, typer.Option(
    min=0, help="aqe: neighbour weight = similarity^alpha.")]
GssKOption = Annotated[int | None, typer.Option(help="gss: neighbours per gallery image.")]
GssQueryKOption = Annotated[int | None, typer.Option(help="gss: gallery neighbours per query.")]
GssBetaOption = Annotated[float | None, typer.Option(
    help="gss: separation threshold beta; default: a percentile of the similarities.")]
GssBetaPercentileOption = Annotated[float | None, typer.Option(
    help="gss: beta as this percentile of the untrained similarities.")]
GssEpochsOption = Annotated[int | None, typer.Option(help="gss: training epochs.")]
GssLrOption = Annotated[float | None, typer.Option(help="gss: Adam learning rate.")]
GssSeedOption = Annotated[int | None, typer.Option(help="gss: seed of the initial weights.")]
GssVerifierOption = Annotated[str | None, typer.Option(
    help="gss-v: the re-ranker that verifies each k-NN edge (elvis, ames, chamfer, sv).")]
GssVerifyThresholdOption = Annotated[float | None, typer.Option(
    help="gss-v: an edge stays where the verifier's fused score reaches this (sv: n + 0.5 "
         "keeps n inliers or more).")]
IndexOption = Annotated[str, typer.Option(
    help="Global search index: auto (flat up to 200,000 gallery images, then ivf, ivfpq from "
         "5M), flat (exact), ivf, hnsw, ivfpq, or a faiss factory string (e.g. IVF4096,SQ8). "
         "An approximate index is saved beside the features (FILE.h5.index/) and reused.")]
NprobeOption = Annotated[int | None, typer.Option(
    min=1, help="IVF lists searched per query (more: slower, higher recall); default 1/64 of "
                "the lists, at least 8.")]
EfSearchOption = Annotated[int | None, typer.Option(
    min=1, help="HNSW candidates kept per query (more: slower, higher recall); default 128.")]
RayOption = Annotated[str | None, typer.Option(
    metavar="[ADDRESS]",
    help="Run the work as Ray tasks (rerank: blocks of queries; extract: shards of images): "
         "alone or `local` starts a cluster here, `auto` or HOST:PORT joins a running one "
         "(`ray start --head`). Needs elvis-cli[ray].")]
RayWorkersOption = Annotated[int | None, typer.Option(
    min=1, help="With --ray and no GPUs: CPU workers side by side; default: one per CPU of the "
                "cluster (with GPUs: one per GPU).")]
POST_OPTIONS = {"aqe_n": AqeNOption, "aqe_alpha": AqeAlphaOption, "gss_k": GssKOption,
                "gss_query_k": GssQueryKOption, "gss_beta": GssBetaOption,
                "gss_beta_percentile": GssBetaPercentileOption, "gss_epochs": GssEpochsOption,
                "gss_lr": GssLrOption, "gss_seed": GssSeedOption,
                "gss_verifier": GssVerifierOption,
                "gss_verify_threshold": GssVerifyThresholdOption}


def _with_post_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with the `--aqe-*` and `--gss-*` options (POST_OPTIONS), declared once here;
    it receives them as one `post_config` (PostConfig), the ones left unset taking the
    library's defaults."""
    signature = inspect.signature(command)
    kept = [param for param in signature.parameters.values() if param.name != "post_config"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=annotation)
             for name, annotation in POST_OPTIONS.items()]

    @functools.wraps(command)
    def with_options(**options: Any) -> None:
        given = {name: options.pop(name) for name in POST_OPTIONS}
        command(**options, post_config=_config("PostConfig", **given))

    with_options.__signature__ = signature.replace(parameters=kept + added)
    with_options.__annotations__ = {**{name: value for name, value in
                                       command.__annotations__.items() if name != "post_config"},
                                    **POST_OPTIONS}
    return with_options


def _version(value: bool) -> None:
    if value:
        console.print(f"elvis-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Batch ELViS re-ranking for instance-level image retrieval."""


def _backbone(preset: str | None, backbone: str | None, image_size: int | None,
              keep_local: int | None, extra: list[str] | None
              ) -> tuple[str | None, dict[str, Any] | None]:
    """The backbone name and options given: a preset's, overridden by explicit options."""
    base = get_preset(preset) if preset else None
    options: dict[str, Any] = dict(base.backbone_options) if base else {}
    if image_size is not None:
        options["image_size"] = image_size
    if keep_local is not None:
        options["num_local"] = keep_local
    options.update(backbone_options(extra or []))
    return backbone or (base.backbone if base else None), options or None


def _model_counts(items: list[str] | None) -> dict[str, int]:
    """MODEL=N items as {model: N}."""
    counts = {}
    for item in items or []:
        model, _, count = item.partition("=")
        if not model or not count.isdigit():
            raise InputError(f"--use-local-of expects MODEL=N, got {item!r}")
        counts[model] = int(count)
    return counts


def _checkpoint(preset: str | None, checkpoint: str | None) -> str | None:
    return checkpoint or (get_preset(preset).checkpoint if preset else None)


@app.command(cls=_Command)
def extract(
    images: Annotated[list[str], typer.Argument(
        metavar="IMAGES",
        help="Folders (recursive), .txt lists of paths, images or quoted globs; several are "
             "taken together (an unquoted glob too), stored relative to their common folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Features file (.h5).")],
    force: Annotated[bool, typer.Option(
        "--force", help="Start over: delete the output and its shards first, e.g. to change "
                        "the backbone settings.")] = False,
    preset: PresetOption = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone name.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Longer image side in pixels.")] = None,
    keep_local: KeepLocalOption = None,
    backbone_option: BackboneOptions = None,
    device: DeviceOption = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward pass.")
                          ] = None,
    shard_size: Annotated[int | None, typer.Option(min=1, help="Images per HDF5 shard.")] = None,
    global_type: Annotated[list[str] | None, typer.Option(
        help="Also store these global descriptors: w-avg, og-avg, the authors' weighted "
             "averages (ViT backbones). cls is always stored.")] = None,
    embedding_cache: EmbeddingCacheOption = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="With --embedding-cache: the checkpoint whose embeddings are stored; default: "
             "the preset's, else the one matching the backbone.")] = None,
    only_shortlisted: Annotated[Path | None, typer.Option(
        help="Only the gallery images in some query's head of this shortlist (.npz or nn "
             "pkl; IMAGES listed as for the features it was built from); writes OUTPUT.nn.npz "
             "(3-row) for rerank --candidates.")] = None,
    head: Annotated[int | None, typer.Option(
        min=1, help="With --only-shortlisted: each query's top N; default: the whole "
                    "shortlist.")] = None,
    ray: RayOption = None,
    ray_workers: RayWorkersOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Extract global and local descriptors into sharded HDF5.

    Re-running the same command resumes, or updates the output when the images changed:
    finished shards are kept, only new, changed or damaged images are extracted (new ones in
    shards of the current --shard-size), removed ones are left out; rows follow the listing.
    Other backbone settings are refused unless --force. Unreadable images are skipped and
    named on stderr, and the exit status is then 3. With --embedding-cache, the images' ELViS
    embeddings are stored too, so that re-ranking does not compute them. With --ray the shards
    are extracted by the workers of a Ray cluster, into the same files.

    Example: `elvis extract imgs/ -o feats.h5`, later `elvis verify feats.h5`; for +1M,
    `elvis extract gallery/ --only-shortlisted shortlist.npz -o heads.h5`
    """
    from elvis_cli import extract_images

    name, options = _backbone(preset, backbone, image_size, keep_local, backbone_option)
    config = _config("ExtractConfig", backbone=name, backbone_options=options, device=device,
                     batch_size=batch_size, shard_size=shard_size, global_types=global_type)
    executor = _ray(ray, ray_workers)
    if only_shortlisted is not None:
        _extract_shortlisted(images, only_shortlisted, output, config, head, force, quiet,
                             embedding_cache, executor)
        return
    if head is not None:
        raise InputError("--head goes with --only-shortlisted")
    with _Progress(enabled=not quiet) as bars:
        run = extract_images(images, output, config, force=force,
                             embedding_cache=embedding_cache,
                             checkpoint=_checkpoint(preset, checkpoint), progress=bars,
                             executor=executor)
    report = run.report
    console.print(f"{report.num_extracted} images extracted, {report.num_resumed} kept, "
                  f"{report.num_removed} removed, {len(report.failures)} skipped -> "
                  f"{report.output}", markup=False, soft_wrap=True)
    for shard in report.repaired:
        print(f"elvis: re-extracted {shard}", file=sys.stderr)
    for path, reason in report.failures:
        print(f"elvis: skipped {path}: {reason}", file=sys.stderr)
    if run.embedded is not None:
        console.print(f"{run.embedded.count} images embedded by {run.embedded.label} -> "
                      f"{run.embedded.folder} ({_human_size(run.embedded.size_bytes)})")
    if report.failures:
        raise typer.Exit(EXIT_PARTIAL)


def _extract_shortlisted(images: list[str], shortlist: Path, output: Path, config: Any,
                         head: int | None, force: bool, quiet: bool,
                         embedding_cache: Path | None, executor: Any) -> None:
    """`elvis extract --only-shortlisted`: the images some query will re-rank."""
    from elvis_cli import extract_shortlisted

    if embedding_cache is not None:
        raise InputError("--embedding-cache does not go with --only-shortlisted")
    with _Progress(enabled=not quiet) as bars:
        run = extract_shortlisted(images if len(images) > 1 else images[0], shortlist, output,
                                  config, head=head, progress=bars, force=force,
                                  executor=executor)
    report = run.extraction
    console.print(f"{run.extraction.num_images} of {run.num_gallery} gallery images (in some "
                  f"query's top {run.head}): {report.num_extracted} extracted, "
                  f"{report.num_resumed} kept -> {report.output}; re-rank with --candidates "
                  f"{run.shortlist} --shortlist {run.head} at most", markup=False,
                  soft_wrap=True)


@app.command(cls=_Command)
def join(
    base: Annotated[Path, typer.Argument(help="Features file whose rows come first.")],
    added: Annotated[Path, typer.Argument(help="Features file added after them "
                                                "(e.g. distractors).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Joined features file (.h5), "
                                                                 "in the same folder.")],
) -> None:
    """Join two features files into one gallery, base first, without extracting either again
    (HDF5 virtual datasets over both): +1M is the base gallery joined with the distractors.

    Both must be extracted with the same settings from the same folder; `elvis verify` on the
    joined file names a base changed since (re-run the join then).

    Example: `elvis join roxford.h5 distractors.h5 -o roxford+1m.h5`
    """
    from elvis_cli import join_features

    report = join_features(base, added, output)
    console.print(f"{report.num_base} + {report.num_added} images -> {report.output}",
                  markup=False, soft_wrap=True)


@app.command(cls=_Command)
def verify(
    features: FeaturesArgument,
) -> None:
    """Check every byte of a features file: each shard against the size and SHA-256 recorded
    when it was written, then that the files open and hold the rows they should.

    One line per shard (ok, missing, damaged); exit status 1 when anything is damaged, with
    what to do. Files without records (the authors' releases) are only opened.

    Example: `elvis verify feats.h5`
    """
    from elvis_cli import verify_features

    report = verify_features(features)
    for shard in report.shards:
        console.print(f"{shard.name}: {shard.state}", markup=False, soft_wrap=True)
    if not report.ok:
        raise InputError(report.summary)
    console.print(report.summary, markup=False, soft_wrap=True)


@app.command(cls=_Command)
def export(
    features: FeaturesArgument,
    out_dir: Annotated[Path, typer.Option(help="Folder for the official files.")],
    name: Annotated[str, typer.Option(help="Descriptor name in the file names, e.g. dinov2.")],
    split: Annotated[str, typer.Option(help="Split in the file names, e.g. query or gallery.")],
    global_type: Annotated[list[str] | None, typer.Option(
        help="Global descriptor types to write; default every one the file holds.")] = None,
) -> None:
    """Write a features file in the authors' layout: NAME_SPLIT_local.hdf5 and one
    NAME_SPLIT_TYPE.hdf5 per global type, dataset `features`, float16.

    Example: `elvis export q.h5 --out-dir roxford5k --name dinov2 --split query`
    """
    from elvis_cli import export_official

    for path in export_official(features, out_dir, name, split, global_type or None):
        console.print(f"-> {path}")


@app.command(cls=_Command)
@_with_post_options
def shortlist(
    features: FeaturesOption = Path("feats.h5"),
    queries: QueriesOption = None,
    gallery: GalleryOption = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query.")] = 100,
    output: Annotated[Path, typer.Option("-o", "--output", help="Shortlist file (.npz).")] = Path(
        "shortlist.npz"),
    global_type: Annotated[str, typer.Option(
        help="Global descriptor type to search with: cls, or w-avg/og-avg where extracted (or "
             "beside released files).")] = "cls",
    allow_external_sources: ExternalOption = False,
    asymmetric: AsymmetricOption = False,
    post: PostOption = "none",
    index: IndexOption = "auto",
    nprobe: NprobeOption = None,
    ef_search: EfSearchOption = None,
    post_config: Any = None,
) -> None:
    """Global k-NN (faiss inner product): all-vs-all in one file, or queries vs gallery;
    exact, or approximate for large galleries (--index).

    Example: `elvis shortlist --features feats.h5 -k 100 -o shortlist.npz --index ivf`
    """
    from elvis_cli import shortlist_files

    with _Progress(transient=True) as bars:
        result = shortlist_files(features, queries=queries, gallery=gallery, k=k, output=output,
                                 global_type=global_type,
                                 allow_external_sources=allow_external_sources,
                                 asymmetric=asymmetric, post=post, post_config=post_config,
                                 progress=bars, index=_index(index, nprobe, ef_search))
    _print_index(result.index)
    _print_post(result.post)
    console.print(f"{result.indices.shape[0]} queries x {result.length} neighbours -> {output}")


@app.command(cls=_Command)
@_with_post_options
def rerank(
    features: FeaturesOption = Path("feats.h5"),
    queries: QueriesOption = None,
    gallery: GalleryOption = None,
    candidates: Annotated[Path | None, typer.Option(
        help="Shortlist file (.npz from `elvis shortlist`, or an official nn_*.pkl); "
             "built on the fly when absent.")] = None,
    shortlist_size: Annotated[int | None, typer.Option(
        "--shortlist", min=1, help="Top entries re-ranked per query.")] = None,
    model: Annotated[str, typer.Option(
        help=f"Re-ranker: {MODEL_NAMES} (global: no re-ranking).")
    ] = "elvis",
    preset: PresetOption = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint name or path; default: the preset's, else the one matching the "
             "features' backbone.")] = None,
    lam: Annotated[float | None, typer.Option(
        help="Fusion weight of the global score; default: the checkpoint's.")] = None,
    temperature: Annotated[float | None, typer.Option(
        "--temp", help="Fusion temperature on the raw score; default: the checkpoint's.")] = None,
    use_local: UseLocalOption = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Pairs scored at once on CUDA.")
                          ] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="CPU threads scoring pairs; default: torch's thread count.")] = None,
    embedding_cache: EmbeddingCacheOption = None,
    device: DeviceOption = None,
    precision: Annotated[str | None, typer.Option(
        help="Similarity products: auto (float16 on CUDA, float32 on CPU), float32, float16.")
    ] = None,
    block_size: Annotated[int | None, typer.Option(
        min=1, help="Queries per part kept in OUTPUT.parts/: the same command, re-run after a "
                    "kill, skips the parts done.")] = None,
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Results: .csv, .parquet, or .jsonl (one line per query with its "
                               "ranking). Image paths open from the current folder; checked "
                               "before any work.")] = Path("reranked.csv"),
    show: Annotated[int, typer.Option(min=0, help="Queries whose top results are printed.")] = 3,
    allow_external_sources: ExternalOption = False,
    asymmetric: AsymmetricOption = False,
    post: PostOption = "none",
    index: IndexOption = "auto",
    nprobe: NprobeOption = None,
    ef_search: EfSearchOption = None,
    ray: RayOption = None,
    ray_workers: RayWorkersOption = None,
    post_config: Any = None,
) -> None:
    """Re-rank each query's global shortlist (ELViS by default) and write the fused ranking.

    Example (in the folder of `elvis extract imgs/ -o feats.h5`): `elvis rerank --shortlist 100`
    """
    from elvis_cli import rerank_files

    config = _config("RerankConfig", shortlist=shortlist_size, num_local=use_local,
                     batch_size=batch_size, device=device, precision=precision,
                     workers=workers, embedding_cache=embedding_cache, block_size=block_size)
    with _Progress(transient=True) as bars:
        run = rerank_files(features, queries=queries, gallery=gallery, candidates=candidates,
                           model=model, checkpoint=_checkpoint(preset, checkpoint), lam=lam,
                           temperature=temperature, config=config, output=output,
                           allow_external_sources=allow_external_sources,
                           asymmetric=asymmetric, progress=bars, post=post,
                           post_config=post_config, index=_index(index, nprobe, ef_search),
                           executor=_ray(ray, ray_workers))
    _print_index(run.index)
    _print_post(run.post)
    if run.job is not None and run.job.summary():
        console.print(run.job.summary(), soft_wrap=True)
    _print_top(run.tables(), show)
    console.print(f"{'checkpoint' if model in ('elvis', 'ames') else 'model'} {run.label} "
                  f"(lam={run.fusion.lam}, temp={run.fusion.temperature}); "
                  f"{run.rows} rows -> {run.output}")


@app.command(cls=_Command)
def search(
    queries: Annotated[list[str], typer.Argument(
        metavar="PHOTO", show_default=False,
        help="Photos to search for: image paths, folders, .txt lists or quoted globs.")],
    gallery: Annotated[Path, typer.Option(
        help="Features file of the gallery, from `elvis extract`.")] = Path("feats.h5"),
    shortlist_size: Annotated[int | None, typer.Option(
        "--shortlist", min=1, help="Global neighbours re-ranked per photo.")] = None,
    model: Annotated[str, typer.Option(
        help=f"Re-ranker: {MODEL_NAMES} (global: no re-ranking).")
    ] = "elvis",
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint name or path; default: the one matching the gallery's backbone.")
    ] = None,
    lam: Annotated[float | None, typer.Option(
        help="Fusion weight of the global score; default: the checkpoint's.")] = None,
    temperature: Annotated[float | None, typer.Option(
        "--temp", help="Fusion temperature on the raw score; default: the checkpoint's.")] = None,
    use_local: UseLocalOption = None,
    embedding_cache: EmbeddingCacheOption = None,
    device: DeviceOption = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Also write the results table: .csv, .parquet or .jsonl.")
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Results printed per photo.")] = 5,
    allow_external_sources: ExternalOption = False,
    query_image_size: QueryImageSizeOption = None,
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
) -> None:
    """Search new photos in an extracted gallery: extract them as the gallery was, shortlist,
    re-rank (ELViS by default) and print the best matches of each.

    Photos that cannot be read are named on stderr and skipped (exit status 3).

    Example: `elvis search new/*.jpg --gallery feats.h5`
    """
    from elvis_cli import search_images

    config = _config("RerankConfig", shortlist=shortlist_size, num_local=use_local,
                     device=device, embedding_cache=embedding_cache)
    with _Progress(enabled=not quiet, transient=True) as bars:
        run = search_images(queries, gallery, model=model, checkpoint=checkpoint, lam=lam,
                            temperature=temperature, config=config, output=output,
                            allow_external_sources=allow_external_sources,
                            query_image_size=query_image_size, progress=bars)
    _print_search(run, top)
    console.print(f"{'checkpoint' if model in ('elvis', 'ames') else 'model'} {run.label} "
                  f"(lam={run.fusion.lam}, temp={run.fusion.temperature})"
                  + (f"; results -> {run.output}" if run.output else ""))
    for photo, reason in run.skipped:
        print(f"elvis: skipped {photo}: {reason}", file=sys.stderr)
    if run.skipped:
        raise typer.Exit(EXIT_PARTIAL)


@app.command(cls=_Command)
def explain(
    query: Annotated[str | None, typer.Argument(
        show_default=False, help="Query image: a photo, or with --features a row index, stored "
                                 "name or path of that file.")] = None,
    gallery: Annotated[str | None, typer.Argument(
        show_default=False, help="Gallery image, likewise (in --gallery-features if given).")
    ] = None,
    features: Annotated[Path | None, typer.Option(
        help="Features file the images are taken from (photos not in it are extracted with "
             "its backbone settings). Without images: a benchmark's features file as `elvis "
             "evaluate` keeps it (DATASET/features/SETTINGS/gallery.h5), whose matching and "
             "non-matching pairs' votes are drawn beneath f and g.")] = None,
    gallery_features: Annotated[Path | None, typer.Option(
        help="Features file of the gallery image; default: --features.")] = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint name or path; default: the one matching the features' backbone (the "
             "bundled one without features).")] = None,
    lam: Annotated[float | None, typer.Option(
        help="Fusion weight of the global score; default: the checkpoint's.")] = None,
    temperature: Annotated[float | None, typer.Option(
        "--temp", help="Fusion temperature on the raw score; default: the checkpoint's.")] = None,
    use_local: UseLocalOption = None,
    device: DeviceOption = None,
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="The picture (.png); checked before any work.")
    ] = Path("explain.png"),
    svg: Annotated[bool, typer.Option("--svg", help="Also write the picture as SVG beside it.")
                   ] = False,
    json_output: Annotated[Path | None, typer.Option(
        "--json", help="Also write the numbers drawn as JSON.")] = None,
    allow_external_sources: ExternalOption = False,
) -> None:
    """Why an image matched: the strongest correspondences before and after optimal transport,
    the dustbin gains and the raw score taken apart, as a picture. Without images: the
    checkpoint's learned f and g.

    Examples: `elvis explain q.jpg g.jpg`, `elvis explain 3 g0095.jpg --features feats.h5`,
    `elvis explain --checkpoint efficientnet-lite0`
    """
    from elvis_cli import explain_files

    options = {"device": device} if device else {}
    if use_local is not None:
        options["num_local"] = use_local
    run = explain_files(query, gallery, features=features, gallery_features=gallery_features,
                        checkpoint=checkpoint, lam=lam, temperature=temperature, output=output,
                        svg=svg, json_output=json_output,
                        allow_external_sources=allow_external_sources, **options)
    if run.pair is not None:
        for line in run.pair.breakdown():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        curves = run.curves
        console.print(f"checkpoint {curves.checkpoint} (lam={curves.fusion.lam}, "
                      f"temp={curves.fusion.temperature}): f and g", highlight=False)
        labelled = curves.labelled
        if labelled is not None:
            console.print(
                f"{labelled.dataset}: {len(labelled.matching_scores)} matching pairs (mean raw "
                f"score {labelled.matching_scores.mean():.2f}), {len(labelled.other_scores)} "
                f"non-matching (mean {labelled.other_scores.mean():.2f})", highlight=False)
    written = [path for path in (run.picture, run.svg, run.json) if path is not None]
    console.print("-> " + ", ".join(map(str, written)), markup=False, highlight=False,
                  soft_wrap=True)


@app.command(cls=_Command)
@_with_post_options
def evaluate(
    data_root: Annotated[Path | None, typer.Option(
        help="Folder of datasets (see `elvis datasets list`); default $ELVIS_DATA_ROOT.")] = None,
    dataset: Annotated[list[str] | None, typer.Option(help="Dataset names.")] = None,
    all_datasets: Annotated[bool, typer.Option(
        "--all-datasets", help="Every ready dataset under the data root.")] = False,
    model: Annotated[list[str] | None, typer.Option(
        help=f"Re-rankers side by side: {MODEL_NAMES}.")] = None,
    preset: PresetOption = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone for extraction.")] = None,
    backbone_option: BackboneOptions = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint name or path; default: the preset's, else the one matching the "
             "features.")] = None,
    descriptors: Annotated[str | None, typer.Option(
        help="Use the released files `<dataset>/<DESC>_{query,gallery}_local.hdf5` and "
             "`nn_<DESC>.pkl` instead of extracting, e.g. `--descriptors dinov2`.")] = None,
    shortlist_sizes: Annotated[list[int] | None, typer.Option(
        "--shortlist", help="Sizes, e.g. `--shortlist 0 25 50 100` (0 = global).")] = None,
    lam: Annotated[float | None, typer.Option(
        help="ELViS fusion weight of the global score; default: the checkpoint's.")] = None,
    temperature: Annotated[float | None, typer.Option(
        "--temp", help="ELViS fusion temperature; default: the checkpoint's.")] = None,
    use_local: UseLocalOption = None,
    use_local_of: Annotated[list[str] | None, typer.Option(
        metavar="MODEL=N", help="A model's own --use-local (a list option), e.g. elvis=300 "
                                "beside --use-local 1000 for sv.")] = None,
    grid: Annotated[bool, typer.Option(
        "--grid", help="Also score every (shortlist, lam, temp) of a grid for ELViS; the best "
                       "is marked (`best`), the defaults stay the headline.")] = False,
    grid_shortlist: Annotated[list[int] | None, typer.Option(
        help="Grid shortlist sizes (implies --grid).")] = None,
    grid_lam: Annotated[list[float] | None, typer.Option(
        help="Grid lam values (implies --grid).")] = None,
    grid_temp: Annotated[list[float] | None, typer.Option(
        help="Grid temperatures (implies --grid).")] = None,
    query_crops: Annotated[bool, typer.Option(
        help="Crop queries to their ground-truth bbx, scaled like the full image (the "
             "authors' bbox switch; off by default, as in their extraction config).")] = False,
    query_image_size: QueryImageSizeOption = None,
    device: DeviceOption = None,
    embedding_cache: EmbeddingCacheOption = None,
    block_size: Annotated[int | None, typer.Option(
        min=1, help="Queries per part of each re-ranking run's scores, kept in OUT_DIR/parts/: "
                    "the same command, re-run after a kill, skips the parts done.")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        help="Where results.json/.csv, runtime.png and parts/ go; default elvis-results.")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="JSON results path.")] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="CSV results path.")] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Runtime/mAP PNG.")] = None,
    per_query_path: Annotated[Path | None, typer.Option(
        "--per-query", help="CSV of each query's AP per dataset, model, shortlist size and "
                            "protocol; default per_query.csv in the out dir.")] = None,
    quiet: Annotated[bool, typer.Option(
        help="No progress display (bars on a terminal, else lines on stderr every "
             "$ELVIS_PROGRESS_INTERVAL seconds, default 10).")] = False,
    post: Annotated[list[str] | None, typer.Option(
        help="Global post-processings side by side: none, aqe, gss, gss-v (each re-ranked by every "
             "model), rerank-aqe (aqe with the re-ranked top n, after re-ranking); e.g. "
             "`--post none,aqe`, shown as elvis@100+aqe.")] = None,
    post_config: Any = None,
    report: Annotated[bool, typer.Option(
        "--report", help="Also write a results page per dataset (`elvis report`) into "
                         "OUT_DIR/report/DATASET.")] = False,
) -> None:
    """Global and re-ranked mAP per dataset, model and shortlist size, with runtime per query.

    Prints one table with a row per dataset (and average rows), the runtime-vs-shortlist curve
    and, per dataset and re-ranker, how many queries re-ranking made better or worse; writes
    results.json, results.csv, per_query.csv (each query's AP) and runtime.png. With --grid,
    every grid combination is written too (column `grid`), and the best per dataset and model
    is printed.

    Example: `elvis evaluate --data-root examples/data --all-datasets --model global,elvis,chamfer`
    """
    from elvis_cli import evaluate_datasets

    if not all_datasets and not dataset:
        raise InputError("name a dataset with --dataset NAME, or use --all-datasets")
    name, options = _backbone(preset, backbone, None, None, backbone_option)
    config = _config("EvaluateConfig", backbone=name, backbone_options=options,
                     checkpoint=_checkpoint(preset, checkpoint), models=model,
                     shortlists=shortlist_sizes, lam=lam, temperature=temperature,
                     num_local=use_local, num_local_of=_model_counts(use_local_of),
                     device=device, descriptors=descriptors,
                     embedding_cache=embedding_cache, query_crops=query_crops,
                     query_image_size=query_image_size, post=post, post_config=post_config,
                     block_size=block_size)
    given = {"shortlists": grid_shortlist, "lams": grid_lam, "temperatures": grid_temp}
    sweep = _config("FusionGrid", **given) if grid or any(given.values()) else None
    outputs = {"out_dir": out_dir, "json_path": json_path, "csv_path": csv_path,
               "plot_path": plot_path, "per_query_path": per_query_path}
    with _Progress(enabled=not quiet, transient=True) as bars:
        run = evaluate_datasets(data_root, None if all_datasets else dataset, config, sweep,
                                progress=bars, results_page=report,
                                **{key: value for key, value in outputs.items() if value})
    _print_results(run)
    for status in run.not_ready:
        wide_console.print(f"[dim]not evaluated: {status.name} ({status.state}): "
                           f"{status.detail}")
    console.print(f"results -> {run.outputs['json']}, {run.outputs['csv']}, "
                  f"{run.outputs['per_query']}, {run.outputs['plot']}", soft_wrap=True)
    for key, folder in run.outputs.items():
        if key.startswith("report "):
            console.print(f"results page -> {folder / 'index.html'}", soft_wrap=True)


@app.command(cls=_Command)
def report(
    results: Annotated[Path, typer.Argument(
        metavar="RESULTS", help="A re-ranking output: .csv, .parquet or .jsonl from "
                                "`elvis rerank -o` (or `elvis search -o`).")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Folder of the page (index.html, page-N.html, thumbs/); an "
                               "earlier report there is replaced.")] = Path("elvis-report"),
    data_root: Annotated[Path | None, typer.Option(
        help="Folder of datasets, for --dataset; default $ELVIS_DATA_ROOT.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="The benchmark the results were made on: its ground truth colours them "
             "(Medium protocol for revisitop sets).")] = None,
    evaluation: Annotated[Path | None, typer.Option(
        help="Folder of `elvis evaluate --out-dir` (results.csv, runtime.png), summarised at "
             "the top; default: the results' folder.")] = None,
    top: Annotated[int | None, typer.Option(
        min=1, help="Results shown per query, before and after re-ranking.")] = None,
    per_page: Annotated[int | None, typer.Option(min=1, help="Queries per page.")] = None,
    max_thumbnails: Annotated[int | None, typer.Option(
        min=0, help="Thumbnails made in all; further images are shown by name.")] = None,
    explain_top: Annotated[int | None, typer.Option(
        min=0, help="Pairs per query (the best re-ranked) drawn by `elvis explain`, with "
                    "--features.")] = None,
    features: Annotated[Path | None, typer.Option(
        help="Features file the results were made from (the queries', with --gallery-features)"
             ": its best pairs get explain pictures.")] = None,
    gallery_features: Annotated[Path | None, typer.Option(
        help="Features file of the gallery; default: --features.")] = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint of the explain pictures; default: the one matching the features.")
    ] = None,
    device: DeviceOption = None,
) -> None:
    """Write a results page of a re-ranking output: per query, the top results before and after
    re-ranking side by side; one folder, opens from disk (no server, no network).

    Example: `elvis report demo-run/reranked.csv -o demo-run/report`
    """
    from elvis_cli import report_results

    config = _config("ReportConfig", top_k=top, queries_per_page=per_page,
                     max_thumbnails=max_thumbnails, explain_top=explain_top)
    with _Progress(transient=True) as bars:
        run = report_results(results, output, data_root=data_root, dataset=dataset,
                             evaluation_dir=evaluation, config=config, features=features,
                             gallery_features=gallery_features, checkpoint=checkpoint,
                             device=device or "cpu", progress=bars)
    colours = (f"coloured by {run.ground_truth}" if run.ground_truth
               else "no ground truth: not coloured")
    console.print(f"{run.queries} queries on {run.pages} page(s), {run.thumbnails} thumbnails, "
                  f"{run.explained} explain pictures ({colours}) -> {run.folder / 'index.html'}",
                  soft_wrap=True)
    for image in run.unreadable:
        print(f"elvis: no thumbnail of {image}: not readable", file=sys.stderr)


datasets_app = typer.Typer(cls=_Group, help="The paper's benchmarks: status and preparation.",
                           no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
DataRoot = Annotated[Path | None, typer.Option(help="Folder of datasets; default "
                                                    "$ELVIS_DATA_ROOT or ~/.cache/elvis/data.")]


@datasets_app.command("list", cls=_Command)
def datasets_list(data_root: DataRoot = None) -> None:
    """Every known benchmark and every custom one under the data root: status, features, size.

    Example: `elvis datasets list --data-root ~/data`
    """
    from elvis_cli import default_data_root, list_datasets

    root = data_root or default_data_root()
    view = Table(title=f"datasets under {root}", title_justify="left")
    for column in ("name", "status", "features", "size", "metric", "to do"):
        view.add_column(column, justify="right" if column == "size" else "left",
                        overflow="fold")
    for status in list_datasets(root):
        view.add_row(status.name, status.state, ", ".join(status.features) or "-",
                     _human_size(status.size_bytes), status.metric, status.detail)
    wide_console.print(view)


@datasets_app.command("prepare", cls=_Command)
def datasets_prepare(
    name: Annotated[str, typer.Argument(
        metavar="NAME", help="Dataset name (see `elvis datasets list`).")],
    data_root: DataRoot = None,
    source: Annotated[Path | None, typer.Option(
        "--from", help="An archive (tar/zip) or folder holding the files already.")] = None,
) -> None:
    """Download (resumable, checksummed) or take from `--from`, then lay out a dataset.

    Offline, it names each file to fetch, its URL and where to put it.

    Example: `elvis datasets prepare roxford5k --from ~/Downloads/`
    """
    from elvis_cli import prepare_dataset

    with _Progress(transient=True) as bars:
        report = prepare_dataset(name, data_root, source, progress=bars)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"{name} -> {report.folder} ({len(report.fetched)} file(s) taken, "
                  f"{len(report.unpacked)} archive(s) unpacked)")


@app.command(cls=_Command)
def train(
    photos: Annotated[str, typer.Argument(
        metavar="PHOTOS", help="Training photos: folder, .txt list or glob.")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Checkpoint file (.pt); checked before training.")],
    val: Annotated[str | None, typer.Option(help="Validation photos (default: 20% split).")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="CSV of path,instance_id for supervised training.")] = None,
    preset: PresetOption = None,
    model: Annotated[str | None, typer.Option(help="Model to train: elvis or ames.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone name.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Longer image side in pixels.")] = None,
    keep_local: KeepLocalOption = None,
    backbone_option: BackboneOptions = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Rounds, each with fresh views.")
                      ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps per round.")] = None,
    views: Annotated[int | None, typer.Option(min=2, help="Views per photo per round.")] = None,
    batch_pairs: Annotated[int | None, typer.Option(min=2, help="Pairs per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    recipe: Annotated[str, typer.Option(
        help="ours, or authors: pairs from the global ranking, 100-399 descriptors per side, "
             "AdamW 5e-4/5e-4, warm-up then cosine (the options above override it).")] = "ours",
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: DeviceOption = None,
) -> None:
    """Train ELViS (or AMES: --model ames) with binary cross-entropy, self-supervised from
    photos or from labels.

    Example: `elvis train photos/train --val photos/val -o my_elvis.pt`
    """
    from elvis_cli import RoundFinished
    from elvis_cli import train as run_train

    name, options = _backbone(preset, backbone, image_size, keep_local, backbone_option)
    config = _config("TrainConfig", "for_recipe", recipe, model=model, backbone=name,
                     backbone_options=options,
                     rounds=rounds, steps_per_round=steps, views_per_image=views,
                     batch_pairs=batch_pairs, lr=lr, seed=seed, device=device)

    def show_round(event: RoundFinished) -> None:
        bars.print(_round_line(event.entry))

    with _Progress(on_other=show_round) as bars:
        report = run_train(photos, output, config, val_source=val, labels=labels,
                           progress=bars)
        for skipped in report.skipped:
            bars.print(f"[yellow]skipped[/yellow] {skipped}")
    console.print(f"checkpoint -> {report.checkpoint} (lam={report.fusion.lam}, "
                  f"temp={report.fusion.temperature})")


class _Progress:
    """The one progress display of the library's `TaskProgress` events: rich bars on a terminal,
    plain lines on stderr elsewhere (a log, a pipe, nohup), where bars would show nothing until
    the end; nothing when not `enabled`. Other events go to `on_other`."""

    def __init__(self, enabled: bool = True, transient: bool = False, on_other=None) -> None:
        self.on_other = on_other
        self.display: _Bars | _Lines | None = None
        if enabled:
            # the stream itself decides, not rich's guess (FORCE_COLOR in a CI log)
            self.display = _Bars(transient) if sys.stdout.isatty() else _Lines(
                _progress_interval())

    def __enter__(self) -> "_Progress":
        if self.display is not None:
            self.display.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.display is not None:
            self.display.stop()

    def __call__(self, event: Any) -> None:
        if not isinstance(event, TaskProgress):
            if self.on_other is not None:
                self.on_other(event)
        elif self.display is not None:
            self.display.show(event)

    def print(self, text: str) -> None:
        """A line of results (above the bars on a terminal)."""
        console.print(text)


# units of the library's tasks, found by the task's last word: "round 2 views" counts views
_UNITS = {"extracting": "img", "re-ranking": "queries", "views": "views", "steps": "steps",
          "GSS": "epochs", "thumbnails": "img", "explaining": "pairs"}
PROGRESS_INTERVAL_VARIABLE = "ELVIS_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 10.0  # seconds between progress lines outside a terminal


def _unit(task: str) -> str:
    return _UNITS.get(task.rsplit(" ", 1)[-1], "")


def _progress_interval() -> float:
    """Seconds between progress lines: $ELVIS_PROGRESS_INTERVAL, else 10 (0: every update)."""
    text = os.environ.get(PROGRESS_INTERVAL_VARIABLE, "").strip()
    if not text:
        return DEFAULT_PROGRESS_INTERVAL
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise InputError(f"{PROGRESS_INTERVAL_VARIABLE} must be a number of seconds (0: every "
                         f"update), got {text!r}")
    return seconds


class _Bars:
    """A rich bar per task label, described by the event's `detail` when it has one and set
    back to zero when a task of the same label starts again (each extraction of `evaluate`)."""

    def __init__(self, transient: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), _rate_column(), TimeElapsedColumn(),
                            _remaining_column(), console=console, transient=transient)
        self.tasks: dict[str, Any] = {}
        self.start, self.stop = self.bar.start, self.bar.stop

    def show(self, event: TaskProgress) -> None:
        total = event.total or None
        description = event.detail or event.task
        task = self.tasks.get(event.task)
        if task is None:  # a resumed task starts where its earlier run stopped
            task = self.tasks[event.task] = self.bar.add_task(
                description, total=total, completed=event.done, unit=_unit(event.task))
        elif event.done == 0:
            self.bar.reset(task, total=total)
        self.bar.update(task, completed=event.done, description=description,
                        pairs_per_second=event.pairs_per_second, eta=event.eta_seconds)


def _rate_column():
    """A column of work done per second: pairs where the task measures them (`310.2
    pairs/s`), else units (`12.5 img/s`; empty for tasks of no unit)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            unit, pairs = task.fields.get("unit"), task.fields.get("pairs_per_second")
            text = (f"{pairs:.1f} pairs/s" if pairs is not None
                    else f"{task.speed or 0.0:.1f} {unit}/s" if unit else "")
            return Text(text, style="progress.data.speed")

    return Rate()


def _remaining_column():
    """The time left: the task's own estimate where it makes one, else rich's."""
    from rich.progress import TimeRemainingColumn
    from rich.text import Text

    class Remaining(TimeRemainingColumn):
        def render(self, task) -> Text:
            eta = task.fields.get("eta")
            if eta is None:
                return super().render(task)
            return Text(_duration(eta), style="progress.remaining")

    return Remaining()


class _Lines:
    """Progress as one plain line at a time on stderr, for logs: at most one line per `interval`
    seconds, the first one `interval` after the start, and the line of a task that finishes
    if it lasted that long. A command that ends or fails sooner prints none: its results or its
    one error line say it all. Each line has done/total, rate, elapsed time and ETA, and no
    terminal codes."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last_line = time.monotonic()
        self.started: dict[str, float] = {}  # task label -> when it (last) started

    def start(self) -> None:
        """Nothing to set up or tear down: each line stands alone."""

    stop = start

    def show(self, event: TaskProgress) -> None:
        now = time.monotonic()
        if event.done == 0 or event.task not in self.started:
            self.started[event.task] = now
        elapsed = now - self.started[event.task]
        finished = 0 < event.total <= event.done and elapsed >= self.interval
        if finished or now - self.last_line >= self.interval:
            self.last_line = now
            print(f"elvis: {_progress_line(event, elapsed)}", file=sys.stderr, flush=True)


def _progress_line(event: TaskProgress, elapsed: float) -> str:
    """E.g. `re-ranking 7/15 (demo: elvis, shortlist 50): 27.8 queries/s, 0s elapsed, ETA 0s`."""
    count = f"{event.done}/{event.total}" if event.total else str(event.done)
    head = f"{event.task} {count}" + (f" ({event.detail})" if event.detail else "")
    rate = event.done / elapsed if elapsed > 0 else 0.0
    figures = [f"{rate:.1f} {_unit(event.task)}/s"] if _unit(event.task) and rate else []
    if event.pairs_per_second is not None:  # the task's own measure: this run's work only
        figures = [f"{event.pairs_per_second:.1f} pairs/s"]
    figures.append(f"{_duration(elapsed)} elapsed")
    if 0 < event.total <= event.done:
        figures.append("done")
    elif event.eta_seconds is not None:
        figures.append(f"ETA {_duration(event.eta_seconds)}")
    elif event.total and rate:
        figures.append(f"ETA {_duration((event.total - event.done) / rate)}")
    return f"{head}: {', '.join(figures)}"


def _duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _print_top(tables, show: int, per_query: int = 5) -> None:
    """The top rows of the first `show` queries, read from the ranking's pieces (`tables`)
    only as far as they are needed."""
    for table in tables:
        if show <= 0:
            return
        for query in table["query_index"].unique()[:show]:
            rows = table[table["query_index"] == query].head(per_query)
            _print_ranking(f"query {query}: {rows['query_path'].iloc[0]}",
                           rows[["rank", "gallery_path", "global_score", "raw_score", "score"]]
                           .itertuples(index=False))
            show -= 1


def _print_search(run, top: int) -> None:
    """Each photo's best `top` matches, from the arrays of a SearchRun: its table would import
    pandas, a few tenths of a second of a one-photo search."""
    result = run.result
    for query, photo in enumerate(run.queries):
        _print_ranking(f"query {query}: {photo}", [
            (rank + 1, run.gallery_paths[index], result.global_scores[query, rank],
             result.raw_scores[query, rank], result.scores[query, rank])
            for rank, index in enumerate(result.indices[query, :top]) if index >= 0])


def _print_ranking(title: str, rows) -> None:
    """One query's (rank, gallery path, global score, raw score, score) rows, paths exactly as
    given (not read as rich markup, folded rather than cut when long)."""
    view = Table(title=Text(title), title_justify="left")
    for column in ("rank", "gallery_path", "global_score", "raw_score", "score"):
        view.add_column(column, justify="left" if column == "gallery_path" else "right",
                        overflow="fold")
    for rank, path, global_score, raw_score, score in rows:
        view.add_row(str(rank), Text(str(path)), f"{global_score:.4f}", f"{raw_score:.2f}",
                     f"{score:.4f}")
    wide_console.print(view)


def _round_line(entry: dict[str, float]) -> str:
    """One printed line per training round: its loss and validation figures."""
    text = (
        f"round {entry['round']}: loss {entry['loss']:.4f}  val acc {entry['val_accuracy']:.3f}  "
        f"val mAP global {entry['val_map_global']:.2f} -> re-ranked {entry['val_map']:.2f} "
        f"(lam {entry['lam']}, temp {entry['temperature']}; paper's 0.5/0.5: "
        f"{entry['val_map_default']:.2f})"
    )
    if entry["skipped_steps"] or entry["log_domain_steps"]:
        text += (f"  [yellow]{entry['skipped_steps']} non-finite steps skipped, "
                 f"{entry['log_domain_steps']} in log-domain Sinkhorn[/yellow]")
    return text


def _print_results(run) -> None:
    """The tables of an EvaluationRun: mAP per dataset, the runtime curve, the grid's best,
    then a line per dataset and re-ranker on the queries it made better and worse."""
    summary = run.summary
    view = Table(title="mAP per dataset (global = no re-ranking; model@k = top k re-ranked)",
                 title_justify="left")
    for column in summary.columns:
        view.add_column(column, justify="left" if column in ("dataset", "metric") else "right")
    for position, row in enumerate(summary.itertuples(index=False)):
        if position == len(summary) - 2:
            view.add_section()
        view.add_row(*(value if isinstance(value, str) else _number(value) for value in row))
    wide_console.print(view)
    curve = run.curve
    slowest = max(curve["seconds_per_query"].max(), 1e-12)
    view = Table(title="runtime vs shortlist size (mean over datasets); bytes/image: read per "
                       "gallery image", title_justify="left")
    for column in ("method", "shortlist", "s/query", "", "mAP", "bytes/image"):
        view.add_column(column, justify="left" if column in ("method", "") else "right")
    for row in curve.itertuples(index=False):
        bar = "█" * max(1, round(30 * row.seconds_per_query / slowest))
        view.add_row(row.method, str(row.shortlist), f"{row.seconds_per_query:.4f}", bar,
                     _number(row.map), _human_size(row.bytes_per_image))
    wide_console.print(view)
    for row in run.grid_best.itertuples(index=False):
        wide_console.print(f"best of the grid (not the headline): {row.dataset} {row.model} "
                           f"shortlist {row.shortlist}, lam {row.lam:g}, temp "
                           f"{row.temperature:g}: mAP {_number(row.map)}")
    for row in run.changes.itertuples(index=False):
        model, plus, post = row.model.partition("+")
        label = row.model if model == "global" else f"{model}@{row.shortlist}{plus}{post}"
        line = (f"{row.dataset}: {label} vs global: {row.better} queries better, {row.worse} "
                f"worse, {row.same} the same")
        extremes = [f"most {word} {query} ({change:+.1f} AP)" for word, query, change in (
            ("helped", row.most_helped, row.gain), ("hurt", row.most_hurt, row.loss))
            if isinstance(query, str)]
        wide_console.print(line + ("; " + ", ".join(extremes) if extremes else ""),
                           markup=False, highlight=False, soft_wrap=True)


def _index(index: str, nprobe: int | None, ef_search: int | None) -> Any:
    """The `IndexConfig` of --index, --nprobe and --ef-search."""
    return _config("IndexConfig", index=index, nprobe=nprobe, ef_search=ef_search)


def _print_index(found) -> None:
    """The one line saying which index made the shortlists, why, and where it is kept."""
    if found is not None:
        console.print(found.describe(), markup=False, soft_wrap=True, highlight=False)


def _print_post(report) -> None:
    """A post-processing's time; for GSS, its training loss at about ten epochs (all of them
    are in the returned report)."""
    if report is None:
        return
    line = f"post {report.method}: {report.seconds:.2f} s"
    if report.losses:
        step = max(1, len(report.losses) // 10)
        shown = sorted({*range(0, len(report.losses), step), len(report.losses) - 1})
        line += (", loss by epoch: " + ", ".join(f"{epoch + 1}: {report.losses[epoch]:.6f}"
                                                  for epoch in shown))
    console.print(line, soft_wrap=True, highlight=False)


def _number(value) -> str:
    return "-" if value != value or value is None else f"{value:.2f}"


def _human_size(size: float) -> str:
    if not size:
        return "-"
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


_NUMBER = re.compile(r"-\d|-\.\d")


def _fill_optional_values(argv: list[str]) -> list[str]:
    """An option of OPTIONAL_VALUES given alone (last, or before another option) with its
    value added: typer's parser has no options whose value may be left out."""
    out = []
    for index, arg in enumerate(argv):
        if arg == "--":
            return out + argv[index:]
        out.append(arg)
        following = argv[index + 1] if index + 1 < len(argv) else "-"
        if arg in OPTIONAL_VALUES and following.startswith("-"):
            out.append(OPTIONAL_VALUES[arg])
    return out


def _expand_lists(argv: list[str]) -> list[str]:
    """Every list option (typer's `multiple` options, found on the command being run) as click
    takes it, one value per occurrence: `--shortlist 0 25 50` and `--model global,elvis` become
    `--shortlist 0 --shortlist 25 ...`. Values follow the option until the next option (a
    negative number is a value) or `--`; `--option=VALUE` takes just that value."""
    command, position = typer.main.get_command(app), 0
    while position < len(argv) and hasattr(command, "commands"):
        if argv[position] in command.commands:
            command = command.commands[argv[position]]
        position += 1
    lists = {opt: param.name for param in getattr(command, "params", [])
             if getattr(param, "multiple", False) and param.param_type_name == "option"
             for opt in param.opts}
    out, rest = argv[:position], argv[position:]
    index = 0
    while index < len(rest):
        arg = rest[index]
        index += 1
        if arg == "--":
            out += rest[index - 1:]
            break
        option, equals, inline = arg.partition("=")
        if option not in lists or (not equals and arg not in lists):
            out.append(arg)
            continue
        values = [inline] if equals else []
        while not equals and index < len(rest) and (not rest[index].startswith("-")
                                                     or _NUMBER.match(rest[index])):
            values.append(rest[index])
            index += 1
        if not values:
            out.append(arg)  # click says the value is missing
        split = lists[option] not in NO_COMMA_SPLIT
        for value in values:
            for part in (value.split(",") if split else [value]):
                if part:
                    out += [option, part]
    return out


# click's usage errors, and those of the copy of click that recent typer versions bundle
USAGE_ERRORS = (click.ClickException,
                next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings as one line; anything else as Python shows it."""
    if issubclass(category, ElvisWarning):
        print(f"elvis: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOW_WARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOW_WARNING = warnings.showwarning


def _ray(address: str | None, workers: int | None) -> Any:
    """The `RayExecutor` of --ray and --ray-workers; None without --ray."""
    if address is None:
        if workers is not None:
            raise InputError("--ray-workers goes with --ray")
        return None
    return _config("RayExecutor", address=address, workers=workers)


def main() -> None:
    """Entry point: user errors become one line on stderr and an exit code, never a traceback."""
    warnings.showwarning = _show_warning
    # the process ends right after: a last garbage collection over torch's and numba's objects
    # would only add half a second to every command that loaded them
    atexit.register(gc.freeze)
    try:
        # without standalone mode click returns typer.Exit's code instead of exiting
        code = app(args=_expand_lists(_fill_optional_values(sys.argv[1:])), prog_name="elvis",
                   standalone_mode=False)
    except ElvisError as error:
        print(f"elvis: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except USAGE_ERRORS as error:
        error.show()
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        print("elvis: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        print(f"elvis: error: {error.strerror or error}{where}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
