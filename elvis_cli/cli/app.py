"""The `elvis` command: a thin typer layer over the library API.

Exit codes: 0 success; 1 the command could not do its job (a one-line `elvis: error: ...` on
stderr); 2 bad command-line usage; 3 finished, but some inputs were skipped (each one named on
stderr); 4 the disk filled up (finished work is kept; re-run to resume); 130 interrupted.
"""

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from elvis_cli import __version__
from elvis_cli.util.atomic import atomic_path
from elvis_cli.util.errors import EXIT_PARTIAL, ElvisError, ElvisWarning, InputError
from elvis_cli.util.progress import TaskProgress

app = typer.Typer(
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
wide_console = console if console.is_terminal else Console(width=160)

DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")]
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
    typer.Option("--backbone-option", help="Extra backbone setting KEY=VALUE (repeatable)."),
]


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


def _backbone_options(image_size: int | None, num_local: int | None,
                      extra: list[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if image_size is not None:
        options["image_size"] = image_size
    if num_local is not None:
        options["num_local"] = num_local
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--backbone-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@app.command()
def extract(
    images: Annotated[str, typer.Argument(help="A folder (recursive), a .txt list of paths, "
                                          "or a quoted glob.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Features file (.h5).")],
    backbone: Annotated[str, typer.Option(help="Backbone name.")] = "efficientnet-lite0",
    image_size: Annotated[int | None, typer.Option(help="Longer image side in pixels.")] = None,
    num_local: Annotated[int | None, typer.Option(help="Local descriptors kept per image.")] = None,
    backbone_option: BackboneOptions = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 16,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per HDF5 shard.")] = 256,
    global_type: Annotated[list[str] | None, typer.Option(
        help="Also store this global descriptor: w-avg or og-avg, the authors' weighted "
             "averages (ViT backbones; repeatable). cls is always stored.")] = None,
    embedding_cache: EmbeddingCacheOption = None,
    checkpoint: Annotated[str | None, typer.Option(
        help="With --embedding-cache: the checkpoint whose embeddings are stored; default: "
             "the one matching the backbone.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Extract global and local descriptors into sharded HDF5.

    Re-running the same command resumes: finished shards are kept. Unreadable images are
    skipped and named on stderr, and the exit status is then 3. With --embedding-cache, the
    images' ELViS embeddings are stored too, so that re-ranking does not compute them.

    Example: `elvis extract imgs/ -o feats.h5`
    """
    from elvis_cli.features.extraction import ExtractConfig, extract_features

    config = ExtractConfig(backbone=backbone, device=device, batch_size=batch_size,
                           shard_size=shard_size, global_types=global_type or (),
                           backbone_options=_backbone_options(image_size, num_local,
                                                              backbone_option))
    with _task_bars(enabled=not quiet, rate="img/s") as bars:
        report = extract_features(images, output, config, progress=bars)
    console.print(f"{report.num_extracted} images extracted, {report.num_resumed} already done, "
                  f"{len(report.failures)} skipped -> {report.output}")
    for shard in report.repaired:
        print(f"elvis: re-extracted {shard}", file=sys.stderr)
    for path, reason in report.failures:
        print(f"elvis: skipped {path}: {reason}", file=sys.stderr)
    if embedding_cache is not None:
        _fill_embedding_cache(report.output, embedding_cache, checkpoint, device)
    if report.failures:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def export(
    features: Annotated[Path, typer.Argument(help="Features file (.h5) from `elvis extract`.")],
    out_dir: Annotated[Path, typer.Option(help="Folder for the official files.")],
    name: Annotated[str, typer.Option(help="Descriptor name in the file names, e.g. dinov2.")],
    split: Annotated[str, typer.Option(help="Split in the file names, e.g. query or gallery.")],
    global_type: Annotated[list[str] | None, typer.Option(
        help="Global descriptor type to write (repeatable); default every one the file "
             "holds.")] = None,
) -> None:
    """Write a features file in the authors' layout: NAME_SPLIT_local.hdf5 and one
    NAME_SPLIT_TYPE.hdf5 per global type, dataset `features`, float16.

    Example: `elvis export q.h5 --out-dir roxford5k --name dinov2 --split query`
    """
    from elvis_cli.features.official_export import export_official

    for path in export_official(features, out_dir, name, split, global_type):
        console.print(f"-> {path}")


def _fill_embedding_cache(features: Path, folder: Path, checkpoint: str | None,
                          device: str) -> None:
    from elvis_cli.features.store import FeatureStore
    from elvis_cli.model.registry import load_reranker
    from elvis_cli.retrieval.rerank import RerankConfig, cache_embeddings

    with FeatureStore.open(features) as store:
        reranker = load_reranker("elvis", store, checkpoint)
        count, size = cache_embeddings(reranker, store,
                                       RerankConfig(device=device, embedding_cache=folder))
    console.print(f"{count} images embedded by {reranker.label} -> {folder} "
                  f"({_human_size(size)})")


@app.command()
def shortlist(
    features: Annotated[Path, typer.Argument(help="Features file for all-vs-all search.")] = Path(
        "feats.h5"),
    queries: Annotated[Path | None, typer.Option(help="Query features (with --gallery).")] = None,
    gallery: Annotated[Path | None, typer.Option(help="Gallery features (with --queries).")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per query.")] = 100,
    output: Annotated[Path, typer.Option("-o", "--output", help="Shortlist file (.npz).")] = Path(
        "shortlist.npz"),
    global_type: Annotated[str, typer.Option(
        help="Global descriptor type to search with: cls, or w-avg/og-avg where extracted (or "
             "beside released files).")] = "cls",
    allow_external_sources: ExternalOption = False,
) -> None:
    """Exact global k-NN (faiss inner product): all-vs-all in one file, or queries vs gallery.

    Example: `elvis shortlist feats.h5 -k 100 -o shortlist.npz`
    """
    from elvis_cli.retrieval.shortlist import save_shortlist

    with _open_pair(features, queries, gallery, allow_external_sources) as (
            query_store, gallery_store, same):
        result = _global_shortlist(query_store, gallery_store, same, k, global_type)
    save_shortlist(output, result)
    console.print(f"{result.indices.shape[0]} queries x {result.length} neighbours -> {output}")


@app.command()
def rerank(
    features: Annotated[Path, typer.Option(help="Features file for all-vs-all retrieval.")] = Path(
        "feats.h5"),
    queries: Annotated[Path | None, typer.Option(help="Query features (with --gallery).")] = None,
    gallery: Annotated[Path | None, typer.Option(help="Gallery features (with --queries).")] = None,
    candidates: Annotated[Path | None, typer.Option(
        help="Shortlist file (.npz from `elvis shortlist`, or an official nn_*.pkl); "
             "built on the fly when absent.")] = None,
    shortlist_size: Annotated[int, typer.Option("--shortlist", min=1,
                                                help="Top entries re-ranked per query.")] = 100,
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint name or path; default: the one matching the features' backbone.")] = None,
    lam: Annotated[float | None, typer.Option(help="Fusion weight of the global score.")] = None,
    temperature: Annotated[float | None, typer.Option(
        "--temp", help="Fusion temperature on the raw score.")] = None,
    num_local: Annotated[int, typer.Option(min=1, help="Descriptors per image used.")] = 600,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs scored at once on CUDA.")] = 100,
    workers: Annotated[int | None, typer.Option(
        min=1, help="CPU threads scoring pairs; default: torch's thread count.")] = None,
    embedding_cache: EmbeddingCacheOption = None,
    device: DeviceOption = "auto",
    precision: Annotated[str, typer.Option(
        help="Similarity products: auto (float16 on CUDA, float32 on CPU), float32, float16.")
    ] = "auto",
    output: Annotated[Path, typer.Option("-o", "--output",
                                         help="Results table: .csv or .parquet.")] = Path(
        "reranked.csv"),
    show: Annotated[int, typer.Option(min=0, help="Queries whose top results are printed.")] = 3,
    allow_external_sources: ExternalOption = False,
) -> None:
    """Re-rank each query's global shortlist with ELViS and write the fused ranking.

    Example (in the folder of `elvis extract imgs/ -o feats.h5`): `elvis rerank --shortlist 100`
    """
    from elvis_cli.features.released import released_gallery
    from elvis_cli.model.registry import load_reranker
    from elvis_cli.retrieval.rerank import RerankConfig, rerank_table
    from elvis_cli.retrieval.rerank import rerank as run_rerank
    from elvis_cli.retrieval.shortlist import load_shortlist

    if output.suffix not in (".csv", ".parquet"):
        raise InputError(f"output must end in .csv or .parquet, got {output.name}")
    with _open_pair(features, queries, gallery, allow_external_sources) as (
            query_store, gallery_store, same):
        reranker = load_reranker("elvis", gallery_store, checkpoint, lam, temperature)
        if candidates is not None:
            candidate_list = load_shortlist(candidates)
            gallery_store = released_gallery(query_store, gallery_store, candidate_list)
        else:
            candidate_list = _global_shortlist(query_store, gallery_store, same, shortlist_size)
        config = RerankConfig(shortlist=shortlist_size, num_local=num_local,
                              batch_size=batch_size, device=device, precision=precision,
                              workers=workers, embedding_cache=embedding_cache)
        with _progress("re-ranking", query_store.num_images) as advance:
            result = run_rerank(reranker, query_store, gallery_store, candidate_list, config,
                                progress=advance)
        table = rerank_table(result, query_store.paths, gallery_store.paths)
    with atomic_path(output) as temporary:
        if output.suffix == ".csv":
            table.to_csv(temporary, index=False)
        else:
            table.to_parquet(temporary, index=False)
    _print_top(table, show)
    fusion = reranker.fusion
    console.print(f"checkpoint {reranker.label} (lam={fusion.lam}, temp={fusion.temperature}); "
                  f"{len(table)} rows -> {output}")


@app.command()
def evaluate(
    data_root: Annotated[Path | None, typer.Option(
        help="Folder of datasets (see `elvis datasets list`); default $ELVIS_DATA_ROOT.")] = None,
    dataset: Annotated[list[str] | None, typer.Option(help="Dataset name (repeatable).")] = None,
    all_datasets: Annotated[bool, typer.Option(
        "--all-datasets", help="Every ready dataset under the data root.")] = False,
    model: Annotated[list[str] | None, typer.Option(
        help="Re-ranker(s) side by side: global, elvis, chamfer (repeatable or comma-separated; "
             "default global,elvis).")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone for extraction.")] = "efficientnet-lite0",
    backbone_option: BackboneOptions = None,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint name or path.")] = None,
    descriptors: Annotated[str | None, typer.Option(
        help="Use the released files <dataset>/<DESC>_{query,gallery}_local.hdf5 and "
             "nn_<DESC>.pkl instead of extracting, e.g. `--descriptors dinov2`.")] = None,
    shortlist_sizes: Annotated[list[int] | None, typer.Option(
        "--shortlist", help="Sizes, e.g. `--shortlist 0 25 50 100` (0 = global).")] = None,
    lam: Annotated[float | None, typer.Option(help="ELViS fusion weight of the global score.")
                   ] = None,
    temperature: Annotated[float | None, typer.Option("--temp", help="ELViS fusion temperature.")
                           ] = None,
    num_local: Annotated[int, typer.Option(min=1, help="Descriptors per image used.")] = 600,
    grid: Annotated[bool, typer.Option(
        "--grid", help="Also score every (shortlist, lam, temp) of a grid for ELViS; the best "
                       "is marked (`best`), the defaults stay the headline.")] = False,
    grid_shortlist: Annotated[list[int] | None, typer.Option(
        help="Grid shortlist sizes (implies --grid); default 100 400.")] = None,
    grid_lam: Annotated[list[float] | None, typer.Option(
        help="Grid lam values (implies --grid); default 0 0.25 0.5 0.75 1.")] = None,
    grid_temp: Annotated[list[float] | None, typer.Option(
        help="Grid temperatures (implies --grid); default 0.1 0.25 0.5 1 2.")] = None,
    query_crops: Annotated[bool, typer.Option(
        help="Crop queries to their ground-truth bbx, scaled like the full image (the "
             "authors' bbox switch; off by default, as in their extraction config).")] = False,
    device: DeviceOption = "auto",
    embedding_cache: EmbeddingCacheOption = None,
    out_dir: Annotated[Path, typer.Option(
        help="Where results.json/.csv and runtime.png go.")] = Path("elvis-results"),
    json_path: Annotated[Path | None, typer.Option("--json", help="JSON results path.")] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="CSV results path.")] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Runtime/mAP PNG.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
) -> None:
    """Global and re-ranked mAP per dataset, model and shortlist size, with runtime per query.

    Prints one table with a row per dataset (and average rows), the runtime-vs-shortlist curve,
    and writes results.json, results.csv and runtime.png. With --grid, every grid combination
    is written too (column `grid`), and the best per dataset and model is printed.

    Example: `elvis evaluate --data-root examples/data --all-datasets --model global,elvis,chamfer`
    """
    from elvis_cli.evaluation.datasets import default_data_root, find_datasets, load_dataset
    from elvis_cli.evaluation.prepare import list_datasets
    from elvis_cli.evaluation.report import plot_runtime, results_table, write_results
    from elvis_cli.evaluation.run import EvaluateConfig, FusionGrid, evaluate_dataset

    root = data_root or default_data_root()
    found = find_datasets(root)
    if all_datasets:
        statuses = {status.name: status for status in list_datasets(root)}
        names = [name for name in found if statuses[name].state == "ready"]
        not_ready = [status for status in statuses.values() if status.state != "ready"]
    elif dataset:
        names, not_ready = dataset, []
    else:
        raise InputError("name a dataset with --dataset NAME, or use --all-datasets")
    if not names:
        raise InputError(f"no ready dataset under {root}; see `elvis datasets list --data-root "
                         f"{root}` and prepare one with `elvis datasets prepare NAME`")
    models = [part for item in (model or ["global,elvis"]) for part in item.split(",") if part]
    config = EvaluateConfig(backbone=backbone, checkpoint=checkpoint, models=models,
                            backbone_options=_backbone_options(None, None, backbone_option),
                            shortlists=shortlist_sizes or (0, 25, 50, 100), lam=lam,
                            temperature=temperature, num_local=num_local, device=device,
                            descriptors=descriptors, embedding_cache=embedding_cache,
                            query_crops=query_crops)
    given = {"shortlists": grid_shortlist, "lams": grid_lam, "temperatures": grid_temp}
    sweep = FusionGrid(**{key: value for key, value in given.items() if value}) \
        if grid or any(given.values()) else None
    stages = config.num_stages() + (sweep.num_stages(config) if sweep else 0)
    results = []
    with _stages(len(names) * stages, enabled=not quiet) as bars:
        for name in names:
            results.append(evaluate_dataset(load_dataset(root, name), config, progress=bars,
                                            on_stage=bars.on_stage, grid=sweep))
    table = results_table(results)
    json_path = json_path or out_dir / "results.json"
    csv_path = csv_path or out_dir / "results.csv"
    plot_path = plot_path or out_dir / "runtime.png"
    write_results(table, json_path, csv_path)
    plot_runtime(table, plot_path)
    _print_results(table)
    for status in not_ready:
        wide_console.print(f"[dim]not evaluated: {status.name} ({status.state}): "
                           f"{status.detail}")
    console.print(f"results -> {json_path}, {csv_path}, {plot_path}")


datasets_app = typer.Typer(help="The paper's benchmarks: status and preparation.",
                           no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
DataRoot = Annotated[Path | None, typer.Option(help="Folder of datasets; default "
                                                    "$ELVIS_DATA_ROOT or ~/.cache/elvis/data.")]


@datasets_app.command("list")
def datasets_list(data_root: DataRoot = None) -> None:
    """Every known benchmark and every custom one under the data root: status, features, size.

    Example: `elvis datasets list --data-root ~/data`
    """
    from elvis_cli.evaluation.datasets import default_data_root
    from elvis_cli.evaluation.prepare import list_datasets
    from elvis_cli.evaluation.registry import REGISTRY

    root = data_root or default_data_root()
    view = Table(title=f"datasets under {root}", title_justify="left")
    for column in ("name", "status", "features", "size", "metric", "to do"):
        view.add_column(column, justify="right" if column == "size" else "left",
                        overflow="fold")
    for status in list_datasets(root):
        entry = REGISTRY.get(status.name)
        view.add_row(status.name, status.state, ", ".join(status.features) or "-",
                     _human_size(status.size_bytes), entry.metric if entry else "custom",
                     status.detail)
    wide_console.print(view)


@datasets_app.command("prepare")
def datasets_prepare(
    name: Annotated[str, typer.Argument(help="Dataset name (see `elvis datasets list`).")],
    data_root: DataRoot = None,
    source: Annotated[Path | None, typer.Option(
        "--from", help="An archive (tar/zip) or folder holding the files already.")] = None,
) -> None:
    """Download (resumable, checksummed) or take from `--from`, then lay out a dataset.

    Offline, it names each file to fetch, its URL and where to put it.

    Example: `elvis datasets prepare roxford5k --from ~/Downloads/`
    """
    from elvis_cli.evaluation.datasets import default_data_root
    from elvis_cli.evaluation.prepare import prepare

    root = data_root or default_data_root()
    with console.status(f"preparing {name}") as status:
        report = prepare(name, root, source, on_file=lambda label: status.update(label))
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"{name} -> {report.folder} ({len(report.fetched)} file(s) taken, "
                  f"{len(report.unpacked)} archive(s) unpacked)")


@app.command()
def train(
    photos: Annotated[str, typer.Argument(help="Training photos: folder, .txt list or glob.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint file (.pt).")],
    val: Annotated[str | None, typer.Option(help="Validation photos (default: 20% split).")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="CSV of path,instance_id for supervised training.")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone name.")] = "efficientnet-lite0",
    image_size: Annotated[int | None, typer.Option(help="Longer image side in pixels.")] = None,
    num_local: Annotated[int | None, typer.Option(help="Local descriptors per image.")] = None,
    backbone_option: BackboneOptions = None,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds, each with fresh views.")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps per round.")] = 300,
    views: Annotated[int, typer.Option(min=2, help="Views per photo per round.")] = 6,
    batch_pairs: Annotated[int, typer.Option(min=2, help="Pairs per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOption = "auto",
) -> None:
    """Train ELViS with binary cross-entropy, self-supervised from photos or from labels.

    Example: `elvis train photos/train --val photos/val -o my_elvis.pt`
    """
    from elvis_cli.training.config import TrainConfig
    from elvis_cli.training.loop import RoundFinished, TrainEvent
    from elvis_cli.training.loop import train as run_train

    config = TrainConfig(backbone=backbone, rounds=rounds, steps_per_round=steps,
                         views_per_image=views, batch_pairs=batch_pairs, lr=lr, seed=seed,
                         device=device,
                         backbone_options=_backbone_options(image_size, num_local,
                                                            backbone_option))
    with _task_bars() as bars:
        def show(event: TrainEvent) -> None:
            if isinstance(event, RoundFinished):
                bars.bar.console.print(_round_line(event.entry))
            else:
                bars(event)

        report = run_train(photos, output, config, val_source=val, labels=labels, progress=show)
        for skipped in report.skipped:
            bars.bar.console.print(f"[yellow]skipped[/yellow] {skipped}")
    console.print(f"checkpoint -> {report.checkpoint} (lam={report.fusion.lam}, "
                  f"temp={report.fusion.temperature})")


class _open_pair:
    """Open one features file (all-vs-all) or a query/gallery pair, closing them afterwards."""

    def __init__(self, features: Path, queries: Path | None, gallery: Path | None,
                 allow_external_sources: bool) -> None:
        if (queries is None) != (gallery is None):
            raise InputError("--queries and --gallery go together")
        self.paths = (queries, gallery) if queries is not None else (features, features)
        self.allow_external = allow_external_sources

    def __enter__(self):
        from elvis_cli.features.released import open_local

        query_path, gallery_path = self.paths
        self.query = open_local(query_path, self.allow_external)
        self.gallery = (self.query if gallery_path == query_path
                        else open_local(gallery_path, self.allow_external))
        return self.query, self.gallery, self.gallery is self.query

    def __exit__(self, *exc_info) -> None:
        self.query.close()
        if self.gallery is not self.query:
            self.gallery.close()


def _global_shortlist(queries, gallery, same: bool, k: int, global_type: str = "cls"):
    from elvis_cli.retrieval.shortlist import build_shortlist

    return build_shortlist(queries.global_descriptors(global_type),
                           gallery.global_descriptors(global_type), k, exclude_self=same)


class _progress:
    """A rich progress bar whose `advance` callable is handed to the library."""

    def __init__(self, label: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress("[progress.description]{task.description}", BarColumn(),
                            MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                            transient=True)
        self.task = self.bar.add_task(label, total=total)

    def __enter__(self):
        self.bar.start()
        return lambda: self.bar.advance(self.task)

    def __exit__(self, *exc_info) -> None:
        self.bar.stop()


def _print_top(table, show: int, per_query: int = 5) -> None:
    for query in table["query_index"].unique()[:show]:
        rows = table[table["query_index"] == query].head(per_query)
        view = Table(title=f"query {query}: {rows['query_path'].iloc[0]}", title_justify="left")
        for column in ("rank", "gallery_path", "global_score", "raw_score", "score"):
            view.add_column(column, justify="left" if column == "gallery_path" else "right")
        for row in rows.itertuples():
            view.add_row(str(row.rank), str(row.gallery_path), f"{row.global_score:.4f}",
                         f"{row.raw_score:.2f}", f"{row.score:.4f}")
        console.print(view)


class _task_bars:
    """Rich bars drawn from the library's TaskProgress events: one bar per task label, set back
    to zero when a task of the same label starts again (each extraction of `evaluate`)."""

    def __init__(self, enabled: bool = True, rate: str | None = None, elapsed: bool = False,
                 transient: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn("[progress.description]{task.description}"), BarColumn(),
                   MofNCompleteColumn()]
        if rate:
            columns.append(_rate_column(rate))
        columns.append(TimeElapsedColumn() if elapsed else TimeRemainingColumn())
        self.bar = Progress(*columns, console=console, transient=transient,
                            disable=not enabled)
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.stop()

    def __call__(self, event: TaskProgress) -> None:
        task = self.tasks.get(event.task)
        if task is None:
            task = self.tasks[event.task] = self.bar.add_task(event.task, total=event.total)
        elif event.done == 0:
            self.bar.reset(task, total=event.total)
        self.bar.update(task, completed=event.done)


def _rate_column(unit: str):
    """A column of units done per second, e.g. `12.5 img/s`."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0.0:.1f} {unit}", style="progress.data.speed")

    return Rate()


class _stages(_task_bars):
    """A bar over every dataset and stage, advanced by `on_stage(label)`, above the bars of
    the library's own tasks (extraction)."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__(enabled, elapsed=True, transient=True)
        self.task = self.bar.add_task("evaluating", total=total)
        self.started = False

    def on_stage(self, label: str) -> None:
        if self.started:
            self.bar.advance(self.task)
        self.started = True
        self.bar.update(self.task, description=label)


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


def _print_results(table) -> None:
    from elvis_cli.evaluation.report import grid_best, runtime_curve, summary_table

    summary = summary_table(table)
    view = Table(title="mAP per dataset (global = no re-ranking; model@k = top k re-ranked)",
                 title_justify="left")
    for column in summary.columns:
        view.add_column(column, justify="left" if column in ("dataset", "metric") else "right")
    for position, row in enumerate(summary.itertuples(index=False)):
        if position == len(summary) - 2:
            view.add_section()
        view.add_row(*(value if isinstance(value, str) else _number(value) for value in row))
    wide_console.print(view)
    curve = runtime_curve(table)
    slowest = max(curve["seconds_per_query"].max(), 1e-12)
    view = Table(title="runtime vs shortlist size (mean over datasets)", title_justify="left")
    for column in ("model", "shortlist", "s/query", "", "mAP"):
        view.add_column(column, justify="left" if column in ("model", "") else "right")
    for row in curve.itertuples(index=False):
        bar = "█" * max(1, round(30 * row.seconds_per_query / slowest))
        view.add_row(row.model, str(row.shortlist), f"{row.seconds_per_query:.4f}", bar,
                     _number(row.map))
    wide_console.print(view)
    for row in grid_best(table).itertuples(index=False):
        wide_console.print(f"best of the grid (not the headline): {row.dataset} {row.model} "
                           f"shortlist {row.shortlist}, lam {row.lam:g}, temp "
                           f"{row.temperature:g}: mAP {_number(row.map)}")


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


_MULTI_VALUE_OPTIONS = ("--shortlist", "--grid-shortlist", "--grid-lam", "--grid-temp")


def _expand_multi_values(argv: list[str]) -> list[str]:
    """Let `--shortlist 25 50 100` (and the --grid-* lists) mean three values for `evaluate`
    (click takes one each)."""
    if not argv or argv[0] != "evaluate":
        return argv
    out: list[str] = []
    position = 0
    while position < len(argv):
        arg = argv[position]
        position += 1
        values = []
        while arg in _MULTI_VALUE_OPTIONS and position < len(argv) \
                and not argv[position].startswith("-"):
            values.append(argv[position])
            position += 1
        out += [item for value in values for item in (arg, value)] if values else [arg]
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


def main() -> None:
    """Entry point: user errors become one line on stderr and an exit code, never a traceback."""
    warnings.showwarning = _show_warning
    try:
        # without standalone mode click returns typer.Exit's code instead of exiting
        code = app(args=_expand_multi_values(sys.argv[1:]), prog_name="elvis",
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
