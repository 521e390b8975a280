"""Approximate shortlists at scale: each index of `elvis shortlist --index` against the exact
one, side by side in one run, on synthetic global descriptors of the real dimensions.

The gallery is a Gaussian mixture on the sphere with structure at two scales, as real
descriptors have (views of one place, places of one kind or city): N / 50
centres ("places") drawn around PLACES_PER_REGION-times fewer random region directions
(cosine ~0.8 to their region, ~0.6 to each other), each image its centre plus isotropic noise
(cosine ~0.9 to it, ~0.8 to the other images of its place), all L2-normalised. A query's top
100 is then its place's images and the nearest ones of the places around it, not chance: in
a mixture of unrelated centres the images beyond a query's own place are all equally far,
and their order is noise no index could reproduce. The queries are new draws of the same
mixture (other photos of gallery places). The gallery is
generated once, in seeded chunks, into a scratch file (as `elvis extract` writes features),
and each index reads it back in chunks (as `elvis shortlist` reads them): it never exists
whole in memory outside the index being built.

For each index: build time (reading the chunks and training included), peak resident memory
above the start of the build (the index, its training sample and one chunk; sampled every
20 ms), queries/s of one batched search of all queries, and recall@K against the exact flat
index's top K.
faiss' OpenMP threads are pinned to the machine's cores (printed).

    PYTHONPATH=$PWD python benchmarks/shortlist_scale.py --sizes 100000          # minutes
    PYTHONPATH=$PWD python benchmarks/shortlist_scale.py --sizes 100000 1000000  # the issue's
"""

import argparse
import gc
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from elvis_cli.retrieval.faiss_index import build_index, configure_search
from elvis_cli.retrieval.index_choice import IndexConfig, plan_index

PLACES_PER_REGION = 20
PLACE_SPREAD = 0.75  # a place around its region: cosine ~0.8 to it
IMAGE_NOISE = 0.5  # an image around its place: cosine ~0.9 to it
CHUNK = 16_384  # gallery rows generated and added at a time
PAGE = os.sysconf("SC_PAGE_SIZE")

# (index, its search settings): each setting searched on the same built index
SETTINGS = {"flat": [{}],
            "ivf": [{"nprobe": n} for n in (8, 16, 32, 64)],
            "hnsw": [{"ef_search": n} for n in (128, 256, 512)],
            "ivfpq": [{"nprobe": n} for n in (16, 64)]}


class Mixture:
    """The synthetic gallery and queries of one (N, D), reproducible from `seed`."""

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        self.size, self.dim, self.seed = size, dim, seed
        rng = np.random.default_rng([seed, dim])
        count = max(PLACES_PER_REGION, size // 50)
        regions = _normalised(rng.standard_normal((count // PLACES_PER_REGION, dim),
                                                  dtype=np.float32))
        self.centres = _normalised(
            regions[np.arange(count) % len(regions)]
            + PLACE_SPREAD * rng.standard_normal((count, dim), dtype=np.float32) / np.sqrt(dim))

    def _draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        picked = self.centres[rng.integers(len(self.centres), size=count)]
        noise = rng.standard_normal((count, self.dim), dtype=np.float32)
        return _normalised(picked + IMAGE_NOISE * noise / np.sqrt(self.dim)).astype(np.float32)

    def write_gallery(self, path: Path) -> None:
        """The gallery, chunk by chunk, as raw float32 rows."""
        with open(path, "wb") as handle:
            for number, start in enumerate(range(0, self.size, CHUNK)):
                self._draw(min(CHUNK, self.size - start),
                           np.random.default_rng([self.seed, self.dim, 1, number])
                           ).tofile(handle)

    def queries(self, count: int) -> np.ndarray:
        return self._draw(count, np.random.default_rng([self.seed, self.dim, 2]))


def read_chunks(path: Path, dim: int) -> Iterator[np.ndarray]:
    """The rows of `path`, CHUNK at a time, each a fresh array (not a mapping of the file,
    whose pages would count as the index's memory)."""
    with open(path, "rb") as handle:
        while (chunk := np.fromfile(handle, np.float32, CHUNK * dim)).size:
            yield chunk.reshape(-1, dim)


def _normalised(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class PeakMemory:
    """Peak resident memory above the level at entry, sampled by a thread."""

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = _resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _resident())

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident())

    @property
    def gigabytes(self) -> float:
        return (self.peak - self.start) / 1e9


def _resident() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def run_size(size: int, dim: int, names: list[str], num_queries: int, k: int,
             scratch: Path) -> None:
    data = Mixture(size, dim)
    queries = data.queries(num_queries)
    gallery = scratch / f"gallery-{size}-{dim}.f32"
    started = time.perf_counter()
    data.write_gallery(gallery)
    print(f"\nN = {size:,}, D = {dim}, {num_queries:,} queries, recall@{k} vs flat, "
          f"{len(data.centres):,} centres (generated in {time.perf_counter() - started:.0f} s)",
          flush=True)
    print(f"{'index':<26} {'settings':<13} {'build s':>8} {'peak GB':>8} {'queries/s':>10} "
          f"{'speed-up':>8} {f'recall@{k}':>10}", flush=True)
    truth, flat_qps = None, None
    for name in ["flat", *[n for n in names if n != "flat"]]:
        gc.collect()
        plan = plan_index(IndexConfig(name), size, dim)
        with PeakMemory() as memory:
            started = time.perf_counter()
            index = build_index(plan, lambda: read_chunks(gallery, dim), size, dim)
            built = time.perf_counter() - started
        for knobs in SETTINGS[name]:
            searched = configure_search(index, plan_index(IndexConfig(name, **knobs), size, dim),
                                        k)
            started = time.perf_counter()
            _, found = index.search(queries, k)
            qps = num_queries / (time.perf_counter() - started)
            if truth is None:
                truth, flat_qps = found, qps
            recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth,
                                                                            strict=True)])
            setting = (f"nprobe {searched.nprobe}" if searched.nprobe else
                       f"ef {searched.ef_search}" if searched.ef_search else "exact")
            print(f"{name + ' ' + plan.factory:<26} {setting:<13} {built:>8.1f} "
                  f"{memory.gigabytes:>8.2f} {qps:>10.0f} {qps / flat_qps:>7.1f}x {recall:>10.3f}",
                  flush=True)
        del index
    gallery.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1280])
    parser.add_argument("--indexes", nargs="+", default=["ivf", "hnsw", "ivfpq"],
                        choices=list(SETTINGS))
    parser.add_argument("--hnsw-up-to", type=int, default=100_000,
                        help="build HNSW only for galleries up to this size (its build is the "
                             "slowest by far on few cores)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the generated gallery (N x D x 4 bytes); default: a "
                             "temporary one")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__} ({faiss.get_compile_options()}), "
          f"{faiss.omp_get_max_threads()} OpenMP threads on {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for size in args.sizes:
            for dim in args.dims:
                names = [name for name in args.indexes
                         if name != "hnsw" or size <= args.hnsw_up_to]
                run_size(size, dim, names, args.queries, args.k, Path(scratch))


if __name__ == "__main__":
    main()
