"""Where re-ranking time goes, side by side in one run: the design choices of the CPU engine.

1. One pair, one thread: the linear-domain transport, votes and f as torch ops (the path CUDA
   and training take) against the compiled loop (fused_sinkhorn), each with its own
   similarity GEMM and exponential.
2. Two steps of the compiled loop, one pair, one thread: the kernel's exponential by torch and
   by numpy, and step 9 (sigmoid(f(vote)) summed) as torch ops and compiled (vote_confidence).
3. The engine's scoring phase (PairScorer, no reading or embedding counted) with 1 and with
   CPU_PAIRS_PER_CALL pairs per worker call, with 1 and 2 workers.

    PYTHONPATH=$PWD python benchmarks/rerank_parts.py        # about 1 min on 2 cores
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import elvis_cli.retrieval.rerank as engine
from benchmarks.rerank_speed import benchmark_model, make_workload
from elvis_cli.features.store import FeatureStore
from elvis_cli.model.elvis import Transport
from elvis_cli.model.elvis_reranker import ElvisReranker
from elvis_cli.model.vote_confidence import confidence_sum, vote_function_parameters


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread and without autograd, as each of the engine's CPU workers runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)


def one_pair(model, query, gallery, repeats: int) -> None:
    problem = Transport(model.rows(query, query=True), model.rows(gallery, query=False),
                        None, None, model.config.regularisation, model.config.sinkhorn_iterations)
    torch_ops = median_ms(lambda: model.score_transport(problem, log_domain=False), repeats)
    model._compiled_scores(query, gallery)  # compiles or loads the loop
    compiled = median_ms(lambda: model._compiled_scores(query, gallery), repeats)
    difference = (model.score_transport(problem, False)
                  - model._compiled_scores(query, gallery)).abs().max()
    print(f"one pair, one thread, GEMM + exponential + Sinkhorn + votes + f: torch ops "
          f"{torch_ops:.2f} ms, compiled loop {compiled:.2f} ms ({torch_ops / compiled:.2f}x); "
          f"max |raw score diff| {difference:.1e}")


def compiled_steps(model, query, gallery, repeats: int) -> None:
    exponent = (query.descriptors[0] @ gallery.descriptors[0].T) / model.config.regularisation
    kernel = torch.empty_like(exponent)
    torch_exp = median_ms(lambda: torch.exp(exponent, out=kernel), repeats)
    numpy_exp = median_ms(lambda: np.exp(exponent.numpy(), out=kernel.numpy()), repeats)
    votes = model.transport(query, gallery).votes
    torch_f = median_ms(lambda: torch.sigmoid(model.f(votes[None, :, None])).sum(), repeats)
    parameters = vote_function_parameters(model.f)
    confidence_sum(votes.numpy(), *parameters)  # compiles or loads the loop
    compiled_f = median_ms(lambda: confidence_sum(votes.numpy(), *parameters), repeats)
    difference = abs(float(torch.sigmoid(model.f(votes[:, None])).sum())
                     - confidence_sum(votes.numpy(), *parameters))
    print(f"one pair's kernel exponential ({kernel.numel()} entries): torch {torch_exp:.3f} ms, "
          f"numpy {numpy_exp:.3f} ms ({torch_exp / numpy_exp:.2f}x); step 9 on its "
          f"{len(votes)} votes: torch ops {torch_f:.3f} ms, compiled {compiled_f:.3f} ms "
          f"({torch_f / compiled_f:.2f}x), |difference| {difference:.1e}")


def scoring_phase(model, folder: Path, shortlist, repeats: int) -> None:
    reranker = ElvisReranker(model)
    pairs = shortlist.indices.size
    chunked = engine.CPU_PAIRS_PER_CALL
    with FeatureStore.open(folder / "queries.h5") as queries, \
            FeatureStore.open(folder / "gallery.h5") as gallery:
        for workers in (1, 2):
            rates = {}
            for per_call in (1, chunked):
                engine.CPU_PAIRS_PER_CALL = per_call
                seconds = []
                for _ in range(repeats):
                    scorer = engine.PairScorer(reranker, queries, gallery, engine.RerankConfig(
                        num_local=600, device="cpu", workers=workers))
                    scorer.score(shortlist.indices)
                    seconds.append(scorer.seconds["score"])
                rates[per_call] = pairs / statistics.median(seconds)
            engine.CPU_PAIRS_PER_CALL = chunked
            print(f"scoring phase, {workers} worker(s): {rates[1]:.1f} pairs/s at 1 pair per "
                  f"call, {rates[chunked]:.1f} at {chunked} ({rates[chunked] / rates[1]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--gallery", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.local, args.dim = 600, 768
    model = benchmark_model(args.dim)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shortlist = make_workload(folder, args)
        with FeatureStore.open(folder / "queries.h5") as queries, \
                FeatureStore.open(folder / "gallery.h5") as gallery:
            src = torch.from_numpy(queries.local_descriptors([0], 600)[0])
            tgt = torch.from_numpy(gallery.local_descriptors([0], 600)[0])
        with one_thread():
            query, gallery = model.embed(src), model.embed(tgt)
            one_pair(model, query, gallery, repeats=30)
            compiled_steps(model, query, gallery, repeats=100)
        scoring_phase(model, folder, shortlist, args.repeats)


if __name__ == "__main__":
    main()
