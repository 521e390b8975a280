"""AMES beside ELViS: what each costs per pair through the same engine, in one run.

The workload of benchmarks/rerank_speed.py (synthetic, stored like real features: float16 HDF5,
600 descriptors of dimension 768 per image), re-ranked at one shortlist size by PairScorer,
reading and embedding included, for each model, after a warm-up of two pairs. ELViS is the
bundled checkpoint's head on a random projection (as in rerank_speed.py); AMES has the
authors' sizes (5 decoder layers, 128-d, 2 heads, feed-forward 1024) with random weights: its
cost does not depend on their values.
Prints pairs/s, seconds per query and the ratio, per device (CPU, and CUDA when present);
then the seconds of one training step of each (`elvis train`'s: BCE on the model's logit of
--train-pairs pairs, backward, AdamW), at the offline backbone's 300 x 320 descriptors.

    PYTHONPATH=$PWD python benchmarks/ames_speed.py               # about 2 min on 2 cores
    PYTHONPATH=$PWD python benchmarks/ames_speed.py --queries 2 --local 300   # quick
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.rerank_speed import benchmark_model, make_workload, timed
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.ames import Ames, AmesConfig
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.elvis_reranker import AmesReranker, ElvisReranker
from elvis_cli.retrieval.rerank import PairScorer, RerankConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--gallery", type=int, default=200)
    parser.add_argument("--local", type=int, default=600, help="descriptors per image")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=1, help="runs per model (median)")
    parser.add_argument("--train-pairs", type=int, default=32, help="pairs per training step")
    args = parser.parse_args()

    torch.manual_seed(0)
    rerankers = {"elvis": ElvisReranker(benchmark_model(args.dim)),
                 "ames": AmesReranker(Ames(AmesConfig(descriptor_dim=args.dim)).eval())}
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    pairs = args.queries * args.shortlist
    with tempfile.TemporaryDirectory() as scratch:
        shortlist = make_workload(Path(scratch), args)
        print(f"workload: {args.queries} queries x {args.shortlist} shortlisted of "
              f"{args.gallery} gallery images, {args.local} x {args.local} descriptors of dim "
              f"{args.dim}; torch threads {torch.get_num_threads()}")
        print(f"{'device':6} {'model':6} {'pairs/s':>9} {'s/query':>9} {'x ELViS':>8}")
        with FeatureStore.open(Path(scratch) / "queries.h5") as queries, \
                FeatureStore.open(Path(scratch) / "gallery.h5") as gallery:
            for device in devices:
                config = RerankConfig(shortlist=args.shortlist, num_local=args.local,
                                      device=device)
                seconds = {}
                for name, reranker in rerankers.items():  # warm-up: numba's cache, threads
                    PairScorer(reranker, queries, gallery, config).score(shortlist.indices[:1, :2])
                    seconds[name], _ = timed(lambda reranker=reranker, config=config: PairScorer(
                        reranker, queries, gallery, config).score(shortlist.indices),
                        args.repeats)
                    print(f"{device:6} {name:6} {pairs / seconds[name]:9.1f} "
                          f"{seconds[name] / args.queries:9.3f} "
                          f"{seconds[name] / seconds['elvis']:8.1f}")
    for model in (Elvis(ElvisConfig(descriptor_dim=320)), Ames(AmesConfig(descriptor_dim=320))):
        print(f"{type(model).__name__}: one training step of {args.train_pairs} pairs, 300 x 300 "
              f"descriptors of dim 320: {train_step_seconds(model, args.train_pairs):.2f} s")


def train_step_seconds(model: Elvis | Ames, pairs: int, repeats: int = 3) -> float:
    """Fastest of `repeats` training steps on random descriptors (what a step computes does
    not depend on their values)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    src, tgt = torch.randn(pairs, 300, 320), torch.randn(pairs, 300, 320)
    labels = (torch.arange(pairs) % 2).float()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(model.logit(model(src, tgt)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return min(times)


if __name__ == "__main__":
    main()
