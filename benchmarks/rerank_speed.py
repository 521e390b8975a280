"""Re-ranking speed: the plain reference path against the production engine, in one run.

A synthetic workload stored like real features (our HDF5 writer, float16, official layout):
Q queries, each with a shortlist of L gallery images, 600 x 600 descriptors of dimension 768,
scored by the bundled checkpoint's trained head on a random 768 -> 128 projection.
Prints pairs/s of the reference of the parity tests (tests/reference_elvis.py in float32, all
per-image work redone per pair, log-domain Sinkhorn), timed one pair at a time and in batches
of pairs the way the authors' forward pass runs; of the production engine (PairScorer, reading
the features); their ratios, the max abs raw-score differences, and end-to-end pairs/s of
`elvis rerank`.

    PYTHONPATH=$PWD python benchmarks/rerank_speed.py            # about 30 s on 2 cores
    PYTHONPATH=$PWD python benchmarks/rerank_speed.py --queries 4 --reference-pairs 8  # quick
"""

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from elvis_cli.cli.app import app
from elvis_cli.features.layout import shard_path
from elvis_cli.features.store import FeatureStore
from elvis_cli.features.writer import finalize, write_shard
from elvis_cli.model.checkpoints import load_checkpoint, save_checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.elvis_reranker import ElvisReranker
from elvis_cli.model.reranker import Fusion
from elvis_cli.retrieval.rerank import PairScorer, RerankConfig
from elvis_cli.retrieval.shortlist import Shortlist, save_shortlist
from tests.reference_elvis import reference_score, reference_scores

SETTINGS = {"name": "synthetic-benchmark"}


def write_features(path: Path, descriptors: np.ndarray, rng: np.random.Generator) -> None:
    count, local, dim = descriptors.shape
    rows = np.zeros((count, local, 5 + dim), dtype=np.float32)
    rows[..., :2] = rng.random((count, local, 2))
    rows[..., 4] = np.linspace(1.0, 0.0, local)
    rows[..., 5:] = descriptors
    names = [f"{path.stem}{i:05d}.jpg" for i in range(count)]
    global_desc = rng.standard_normal((count, 16)).astype(np.float32)
    write_shard(shard_path(path, 0), rows, global_desc, names, names, np.ones((count, 2), np.int32))
    finalize(path, [shard_path(path, 0)], SETTINGS, path.parent)


def unit(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=-1, keepdims=True)).astype(np.float32)


def make_workload(folder: Path, args) -> Shortlist:
    """Gallery images: half are noisy views of a query (a third of its descriptors), half not."""
    rng = np.random.default_rng(0)
    shape = (args.local, args.dim)
    queries = unit(rng.standard_normal((args.queries, *shape), dtype=np.float32))
    gallery = unit(rng.standard_normal((args.gallery, *shape), dtype=np.float32))
    for image in range(0, args.gallery, 2):
        source = queries[image // 2 % args.queries]
        shared = rng.choice(args.local, args.local // 3, replace=False)
        noise = rng.standard_normal((len(shared), args.dim), dtype=np.float32)
        gallery[image, shared] = unit(source[shared] + 0.5 * noise / np.sqrt(args.dim))
    write_features(folder / "queries.h5", queries, rng)
    write_features(folder / "gallery.h5", gallery, rng)
    indices = np.stack([rng.choice(args.gallery, args.shortlist, replace=False)
                        for _ in range(args.queries)])
    similarities = np.sort(rng.random(indices.shape).astype(np.float32), axis=1)[:, ::-1]
    shortlist = Shortlist(indices, np.ascontiguousarray(similarities))
    save_shortlist(folder / "shortlist.npz", shortlist)
    return shortlist


def timed(run, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--gallery", type=int, default=300)
    parser.add_argument("--local", type=int, default=600, help="descriptors per image")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--reference-pairs", type=int, default=16,
                        help="pairs scored by the (slow) reference path")
    parser.add_argument("--batched-pairs", type=int, default=100,
                        help="pairs scored by the reference in batches")
    parser.add_argument("--batch", type=int, default=50, help="its pairs per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.workdir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        shortlist = make_workload(folder, args)
        print(f"workload: {args.queries} queries x {args.shortlist} shortlisted of {args.gallery}"
              f" gallery images, {args.local} x {args.local} descriptors of dim {args.dim}"
              f" (written in {time.perf_counter() - started:.1f} s); torch threads "
              f"{torch.get_num_threads()}")
        model = benchmark_model(args.dim)
        reranker = ElvisReranker(model)
        pairs = args.queries * args.shortlist

        with FeatureStore.open(folder / "queries.h5") as queries, \
                FeatureStore.open(folder / "gallery.h5") as gallery:
            config = RerankConfig(shortlist=args.shortlist, num_local=args.local, device="cpu")
            scorers = []

            def production_run():
                scorers.append(PairScorer(reranker, queries, gallery, config))  # nothing embedded
                return scorers[-1].score(shortlist.indices)

            seconds, raw = timed(production_run, args.repeats)
            kernel = pairs / statistics.median(s.seconds["score"] for s in scorers)
            embedding = statistics.median(s.seconds["read and embed"] for s in scorers)
            production, scorer = pairs / seconds, scorers[-1]
            cached = dataclasses.replace(config, embedding_cache=folder / "embeddings")
            PairScorer(reranker, queries, gallery, cached).score(shortlist.indices)  # fills it
            warm, warm_raw = timed(
                lambda: PairScorer(reranker, queries, gallery, cached).score(shortlist.indices),
                args.repeats)
            reference, raw32, raw64 = reference_path(model, queries, gallery, shortlist, args)
            batched, raw_batched = batched_reference_path(model, queries, gallery, shortlist,
                                                          args)
        chosen = raw.reshape(-1)[: len(raw32)]
        print(f"reference (plain, float32), one pair at a time: {reference:7.1f} pairs/s "
              f"({args.reference_pairs} pairs, best of 1 and {torch.get_num_threads()} threads)")
        print(f"reference in batches of {args.batch} pairs (as the authors' forward pass): "
              f"{batched:.1f} pairs/s ({args.batched_pairs} pairs)")
        print(f"production (PairScorer, from HDF5):   {production:9.1f} pairs/s "
              f"({pairs} pairs, median of {args.repeats}; {scorer.workers} worker threads, "
              f"{scorer.pairs_per_call} pair(s) per call)")
        print(f"  of which the scoring kernel alone:  {kernel:9.1f} pairs/s "
              "(without reading and embedding the images)")
        images = args.queries + len(np.unique(shortlist.indices))  # those read and embedded
        print(f"  reading and embedding {images} images: {embedding:.3f} s wall "
              f"({1e3 * embedding / images:.2f} ms per image)")
        print(f"production, embedding cache warm:     {pairs / warm:9.1f} pairs/s "
              f"(same bits: {warm_raw.tobytes() == raw.tobytes()}; images loaded, not embedded)")
        print(f"ratio production / reference: {production / reference:.1f}x one pair at a time,"
              f" {production / batched:.1f}x batched")
        print(f"raw scores: min {np.min(raw):.1f}, median {np.median(raw):.1f}, max "
              f"{np.max(raw):.1f}")
        batched_diff = np.abs(raw.reshape(-1)[: len(raw_batched)] - raw_batched).max()
        print(f"max |raw diff| vs float32 reference:  {np.abs(chosen - raw32).max():.2e} "
              f"(one at a time), {batched_diff:.2e} (batched)")
        print(f"max |raw diff| vs float64 reference:  {np.abs(chosen - raw64).max():.2e}")

        command = ["rerank", "--queries", str(folder / "queries.h5"), "--gallery",
                   str(folder / "gallery.h5"), "--candidates", str(folder / "shortlist.npz"),
                   "--shortlist", str(args.shortlist), "--num-local", str(args.local),
                   "--checkpoint", str(folder / "model.pt"), "--device", "cpu",
                   "-o", str(folder / "reranked.csv"), "--show", "0"]
        save_checkpoint(folder / "model.pt", model, SETTINGS, Fusion(0.5, 0.5))
        seconds, _ = timed(lambda: app(args=command, standalone_mode=False), args.repeats)
        print(f"end-to-end `elvis rerank` (in process): {pairs / seconds:7.1f} pairs/s "
              f"({kernel * seconds / pairs:.2f}x the kernel's time, "
              f"{production * seconds / pairs:.2f}x the production path's)")
        seconds, _ = timed(lambda: app(args=[*command, "--embedding-cache",
                                             str(folder / "embeddings")], standalone_mode=False),
                           args.repeats)
        print(f"  with --embedding-cache, warm:       {pairs / seconds:7.1f} pairs/s "
              f"({kernel * seconds / pairs:.2f}x the kernel's time)")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "elvis_cli", *command], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"`python -m elvis_cli rerank` as a new process, once: "
              f"{time.perf_counter() - started:.1f} s wall (start-up included)")


def benchmark_model(dim: int) -> Elvis:
    """The bundled checkpoint's trained head (dustbin MLP, f, g) on a random dim -> 128
    projection. A default-initialised f is nearly flat, so every pair would score about the
    same and score differences would say little; this head separates matches (~400) from
    non-matches (~55) on this workload."""
    torch.manual_seed(0)
    model = Elvis(ElvisConfig(descriptor_dim=dim)).eval()
    trained = load_checkpoint("efficientnet-lite0").model.state_dict()
    model.load_state_dict({name: value for name, value in trained.items()
                           if not name.startswith("remap_local.0.")}, strict=False)
    return model


def batched_reference_path(model, queries, gallery, shortlist, args):
    """The reference in float32 on batches of pairs, as the authors' forward pass runs: per-image
    work redone for every pair, log-sum-exp Sinkhorn over the batch. Returns pairs/s (median per
    batch) and the scores of the first pairs in query order."""
    state = model.state_dict()
    pairs = [(q, int(g)) for q, row in enumerate(shortlist.indices) for g in row]
    pairs = pairs[: args.batched_pairs]
    rates, raw = [], []
    for start in range(0, len(pairs), args.batch):
        batch = pairs[start : start + args.batch]
        src = torch.from_numpy(queries.local_descriptors([q for q, _ in batch], args.local)[0])
        tgt = torch.from_numpy(gallery.local_descriptors([g for _, g in batch], args.local)[0])
        started = time.perf_counter()
        raw.append(reference_scores(state, src, tgt, dtype=torch.float32))
        rates.append(len(batch) / (time.perf_counter() - started))
    return statistics.median(rates), torch.cat(raw).numpy()


def reference_path(model, queries, gallery, shortlist, args):
    """The reference on the first pairs in query order: its scores, and pairs/s (median per
    pair) with torch's threads or with one thread, whichever is faster on this machine."""
    state = model.state_dict()
    pairs = [(q, int(g)) for q, row in enumerate(shortlist.indices) for g in row]
    pairs = pairs[: args.reference_pairs]
    threads = torch.get_num_threads()
    times: dict[int, list[float]] = {threads: [], 1: []}
    raw32, raw64 = [], []
    for q, g in pairs:
        src = torch.from_numpy(queries.local_descriptors([q], args.local)[0][0])
        tgt = torch.from_numpy(gallery.local_descriptors([g], args.local)[0][0])
        for count in times:
            torch.set_num_threads(count)
            started = time.perf_counter()
            score = reference_score(state, src, tgt, dtype=torch.float32)
            times[count].append(time.perf_counter() - started)
        torch.set_num_threads(threads)
        raw32.append(score)
        raw64.append(reference_score(state, src, tgt))
    return max(1.0 / statistics.median(t) for t in times.values()), np.array(raw32), np.array(
        raw64)


if __name__ == "__main__":
    main()
