"""A simulated large run: a synthetic gallery with stored local descriptors, shortlisted with
IVF and re-ranked by ELViS on Ray with 1 and with 2 workers, in one run.

The gallery is written as `elvis extract` writes features (our shard writer, float16, one
shard of SHARD images at a time, then the joined file), so `elvis rerank` reads it as it would
real features: K = 600 local descriptors of D = 128 per image, in the RootSIFT space of the
bundled `efficientnet-lite0-rootsift` checkpoint, which scores them. It is clustered: images
belong to places (PLACE_SIZE images each), image i to place i mod places. The places' global
centres are those of shortlist_scale.py's mixture (places around regions, as real galleries
have), an image's global descriptor its place's centre plus noise (cosine ~0.9 to it); a
third of its local descriptors are its place's (noisy views of one bank of descriptors per
place), the rest its own. RootSIFT-like: every descriptor non-negative and of unit length.
The queries are other images of gallery places, so a query's shortlist holds its place's
images, not chance.

Measured: the writing of the files; the IVF index's build with the first shortlist and a
search with the saved index, the shortlist's recall@k against exact search and the share of
each query's place's images that either finds; then
`rerank_files(..., executor=RayExecutor(workers=N))` (`elvis rerank --index ivf --ray
--ray-workers N`) of every query's top k for N = 1 and 2 in a local Ray cluster of N CPUs:
wall time (the cluster's start apart), pairs/s, queries/s, the peak resident memory (VmHWM)
of the driver and of each Ray worker that ran a block, and the workers' CPU time: on a shared
machine pairs per CPU-second, not wall time, says what a worker with a core of its own does.
The two runs' tables must be the same bytes. The files are deleted at the end unless --keep.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/scale_sim.py               # 100k: ~15 GB
    PYTHONPATH=$PWD python benchmarks/scale_sim.py --images 5000 --queries 100   # a minute
"""

import argparse
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.shortlist_scale import Mixture
from elvis_cli.features.layout import NUM_META, shard_path
from elvis_cli.features.writer import finalize, write_shard
from elvis_cli.model.checkpoints import BUNDLED_CHECKPOINTS
from elvis_cli.retrieval.config import RerankConfig
from elvis_cli.retrieval.files import rerank_files, shortlist_files
from elvis_cli.retrieval.index_choice import IndexConfig
from elvis_cli.util.ray_cluster import RayExecutor
from tests.helpers import ray_workers_running

CHECKPOINT = "efficientnet-lite0-rootsift"
NUM_LOCAL, LOCAL_DIM = 600, 128
SHARD = 500  # images per shard: one shard is about 80 MB at float16
PLACE_SIZE = 50  # gallery images per place (as shortlist_scale.py's mixture has)
IMAGE_NOISE = 0.5  # global descriptor around its place's centre: cosine ~0.9
SHARED_LOCAL = NUM_LOCAL // 3  # local descriptors an image shares with its place
LOCAL_NOISE = 0.3  # a shared local descriptor around its place's: cosine ~0.95
PAGE = os.sysconf("SC_PAGE_SIZE")


class Places:
    """The synthetic world of a gallery of `images`, reproducible from `seed`: places, each a
    global centre and a bank of local descriptors (drawn when needed, never all held)."""

    def __init__(self, images: int, global_dim: int, seed: int = 0) -> None:
        self.global_dim, self.seed = global_dim, seed
        self.centres = Mixture(images, global_dim, seed).centres
        self.count = len(self.centres)

    def bank(self, place: int) -> np.ndarray:
        return np.abs(np.random.default_rng([self.seed, 1, place]).standard_normal(
            (SHARED_LOCAL, LOCAL_DIM), dtype=np.float32))

    def image(self, place: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One image of `place`: its (K, D) local descriptors and its global descriptor."""
        local = np.abs(rng.standard_normal((NUM_LOCAL, LOCAL_DIM), dtype=np.float32))
        shared = rng.choice(NUM_LOCAL, SHARED_LOCAL, replace=False)
        local[shared] = self.bank(place) + LOCAL_NOISE * local[shared]
        noise = rng.standard_normal(self.global_dim, dtype=np.float32)
        glob = self.centres[place] + IMAGE_NOISE * noise / np.sqrt(self.global_dim)
        return _unit(local), _unit(glob)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def write_shard_of(places: Places, path: Path, number: int, first: int, count: int,
                   stream: int) -> dict:
    """Images first..first+count-1 of features file `path` (image i of place i mod places),
    as shard `number`; returns its record."""
    rng = np.random.default_rng([places.seed, stream, number])
    rows = np.zeros((count, NUM_LOCAL, NUM_META + LOCAL_DIM), dtype=np.float16)
    rows[..., :2] = rng.random((count, NUM_LOCAL, 2))
    rows[..., NUM_META - 1] = np.linspace(1.0, 0.0, NUM_LOCAL)
    global_desc = np.empty((count, places.global_dim), dtype=np.float32)
    for row in range(count):
        rows[row, :, NUM_META:], global_desc[row] = places.image((first + row) % places.count,
                                                                 rng)
    names = [f"{path.stem}/{first + row:07d}.jpg" for row in range(count)]
    return write_shard(shard_path(path, number), rows, global_desc, names, names,
                       np.full((count, 2), 480, np.int32))


def write_features(places: Places, path: Path, images: int, stream: int, jobs: int) -> float:
    """Features file `path` of `images` images, shards written by `jobs` processes; seconds."""
    started = time.perf_counter()
    starts = range(0, images, SHARD)
    with ProcessPoolExecutor(jobs) as pool:
        records = list(pool.map(write_shard_of, [places] * len(starts), [path] * len(starts),
                                range(len(starts)), starts,
                                [min(SHARD, images - s) for s in starts], [stream] * len(starts)))
    finalize(path, [shard_path(path, n) for n in range(len(starts))],
             BUNDLED_CHECKPOINTS[CHECKPOINT].backbone, path.parent, records=records)
    return time.perf_counter() - started


class RayWorkers:
    """The peak resident memory (VmHWM) and CPU time of every worker of this process's Ray
    cluster seen running a re-ranking block, sampled by a thread from /proc: CPU seconds are
    what a shared machine's other jobs leave to the workers, so pairs per CPU-second is the
    speed of a core of one's own."""

    def __enter__(self) -> "RayWorkers":
        self.peaks: dict[int, int] = {}
        self.cpu_seconds: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for pid in ray_workers_running("_rerank_block"):
                try:
                    self.peaks[pid] = peak_memory(Path(f"/proc/{pid}"))
                    self.cpu_seconds[pid] = cpu_seconds(pid)
                except OSError:  # it ended meanwhile
                    continue

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_memory(process: Path = Path("/proc/self")) -> int:
    """VmHWM of a process, in bytes."""
    for line in (process / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmHWM in {process}/status")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_memory() -> None:
    """Start this process's VmHWM again from its present resident size (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def rerank_on_ray(folder: Path, workers: int, k: int, block_size: int
                  ) -> tuple[Path, float, float]:
    """The run's table, its pairs/s, and its pairs per CPU-second of the workers."""
    import ray

    output = folder / f"ray-{workers}.parquet"
    started = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    cluster = time.perf_counter() - started
    reset_peak_memory()
    try:
        with RayWorkers() as workers_seen:
            started = time.perf_counter()
            run = rerank_files(queries=folder / "queries.h5", gallery=folder / "gallery.h5",
                               checkpoint=CHECKPOINT, index=IndexConfig("ivf"),
                               config=RerankConfig(shortlist=k, block_size=block_size),
                               output=output, executor=RayExecutor(workers=workers))
            seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    queries = run.rows // k
    pairs, cpu = queries * k, workers_seen.cpu_seconds
    print(f"{workers} Ray worker(s): cluster started in {cluster:.1f} s; {pairs:,} pairs in "
          f"{seconds:.1f} s: {pairs / seconds:.0f} pairs/s, {queries / seconds:.2f} queries/s; "
          f"peak RSS driver {peak_memory() / 1e9:.2f} GB, workers "
          f"{', '.join(f'{workers_seen.peaks[p] / 1e9:.2f}' for p in sorted(cpu))} GB; workers' "
          f"CPU {', '.join(f'{cpu[p]:.0f}' for p in sorted(cpu))} s: "
          f"{pairs / sum(cpu.values()):.0f} pairs per CPU-second", flush=True)
    return output, pairs / seconds, pairs / sum(cpu.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--global-dim", type=int, default=768)
    parser.add_argument("--block-size", type=int, default=50, help="queries per Ray task")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="processes writing the gallery's shards")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the features (about 160 kB an image); default: a "
                             "temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the files (printed)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="scale-sim-", dir=args.scratch))
    places = Places(args.images, args.global_dim)
    print(f"{args.images:,} gallery images of {places.count:,} places, {args.queries:,} "
          f"queries, K = {NUM_LOCAL}, D = {LOCAL_DIM}, k = {args.k}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; in {folder}", flush=True)
    try:
        seconds = write_features(places, folder / "gallery.h5", args.images, 2, args.jobs)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"gallery written in {seconds:.0f} s ({size / 1e9:.1f} GB, "
              f"{args.images / seconds:.0f} images/s)", flush=True)
        write_features(places, folder / "queries.h5", args.queries, 3, args.jobs)
        found = {}
        for name, index in (("ivf build + search", "ivf"), ("ivf search (saved index)", "ivf"),
                            ("flat (exact) search", "flat")):
            started = time.perf_counter()
            found[index] = shortlist_files(queries=folder / "queries.h5",
                                           gallery=folder / "gallery.h5", k=args.k,
                                           index=IndexConfig(index)).indices
            print(f"shortlist, {name}: {time.perf_counter() - started:.1f} s", flush=True)
        recall = np.mean([len(np.intersect1d(a, b)) / args.k
                          for a, b in zip(found["ivf"], found["flat"], strict=True)])
        own = {index: np.mean(rows % places.count
                              == (np.arange(args.queries) % places.count)[:, None])
               * args.k / PLACE_SIZE for index, rows in found.items()}
        print(f"ivf recall@{args.k} against exact: {recall:.3f}; share of a query's place's "
              f"{PLACE_SIZE} images in its top {args.k}: ivf {own['ivf']:.3f}, exact "
              f"{own['flat']:.3f}", flush=True)
        one, rate_one, per_cpu_one = rerank_on_ray(folder, 1, args.k, args.block_size)
        two, rate_two, per_cpu_two = rerank_on_ray(folder, 2, args.k, args.block_size)
        same = one.read_bytes() == two.read_bytes()
        print(f"scaling 2 vs 1 workers: {rate_two / rate_one:.2f}x in wall time; pairs per "
              f"CPU-second {per_cpu_two / per_cpu_one:.2f}x; tables the same bytes: {same}",
              flush=True)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
