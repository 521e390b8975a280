"""`elvis rerank --ray` (retrieval/ray_runner.py) and `elvis extract --ray`
(features/ray_extraction.py): the blocks of a re-ranking job, or the shards of an extraction,
as tasks of a local Ray cluster of 2 workers write the same bytes as one process; a part
missing is redone on the cluster, and so is the block of a worker killed while doing it;
without Ray, `--ray` is one line naming the extra."""

import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from elvis_cli.retrieval.job import parts_folder
from tests.conftest import SMALL
from tests.helpers import cli_in, random_checkpoint, ray_workers_running, write_store, write_views

NUM_IMAGES, SHORTLIST, BLOCK = 12, 4, 3  # 4 blocks: each of the 2 workers does several
ARGS = ["rerank", "--features", "g.h5", "--checkpoint", "c.pt", "--shortlist", str(SHORTLIST),
        "--block-size", str(BLOCK), "--show", "1"]


@pytest.fixture
def folder(tmp_path) -> Path:
    """g.h5 (12 images, some mostly or all padding) and a checkpoint c.pt for it."""
    real = [14, 14, 3, 14, 0, 14, 9, 14, 14, 5, 14, 14]
    write_store(tmp_path / "g.h5", np.random.default_rng(0), NUM_IMAGES, 14, real).close()
    random_checkpoint(tmp_path / "c.pt", 48, {"name": "test"})
    return tmp_path


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPU workers, which `--ray` finds already started and uses."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'elvis-cli[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as error:  # any reason Ray cannot start here skips the test
        pytest.skip(f"a local Ray cluster cannot start here: {error}")
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_ray_run_writes_the_bytes_of_one_process(cluster, folder, suffix):
    alone = cli_in(*ARGS, "-o", f"alone{suffix}", cwd=folder)
    assert alone.returncode == 0, alone.stderr
    on_ray = cli_in(*ARGS, "-o", f"ray{suffix}", "--ray", "--ray-workers", "2", cwd=folder)
    assert on_ray.returncode == 0, on_ray.stderr
    assert (folder / f"ray{suffix}").read_bytes() == (folder / f"alone{suffix}").read_bytes()
    assert len(list(parts_folder(folder / f"ray{suffix}").glob("part-*.npz"))) == 4


@pytest.mark.slow
@pytest.mark.subprocess
def test_ray_run_redoes_only_the_missing_part(cluster, folder):
    alone = cli_in(*ARGS, "-o", "alone.csv", cwd=folder)
    assert alone.returncode == 0, alone.stderr
    first = cli_in(*ARGS, "-o", "ray.csv", "--ray", cwd=folder)
    assert first.returncode == 0, first.stderr
    (parts_folder(folder / "ray.csv") / "part-00002.npz").unlink()  # a block's worker killed
    (folder / "ray.csv").unlink()
    again = cli_in(*ARGS, "-o", "ray.csv", "--ray", cwd=folder)
    assert again.returncode == 0, again.stderr
    assert "resumed: 3 of 4 blocks kept" in again.stdout
    assert (folder / "ray.csv").read_bytes() == (folder / "alone.csv").read_bytes()


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_worker_killed_in_a_block_has_its_block_done_again(cluster, tmp_path):
    """20 blocks of 2 queries: a worker is found running one and SIGKILLed; Ray starts
    another, which does that block again."""
    write_store(tmp_path / "g.h5", np.random.default_rng(1), 40, 100, [100] * 40).close()
    random_checkpoint(tmp_path / "c.pt", 48, {"name": "test"})
    args = ["rerank", "--features", "g.h5", "--checkpoint", "c.pt", "--shortlist", "8",
            "--block-size", "2"]
    alone = cli_in(*args, "-o", "alone.csv", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    killed, finished = [], threading.Event()

    def kill_one_worker() -> None:
        while not killed and not finished.wait(0.002):
            for pid in ray_workers_running("_rerank_block")[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    try:
        on_ray = cli_in(*args, "-o", "ray.csv", "--ray", cwd=tmp_path)
    finally:
        finished.set()
        killer.join()
    assert killed, "no worker was seen running a block"
    assert on_ray.returncode == 0, on_ray.stderr
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "alone.csv").read_bytes()


@pytest.mark.slow
@pytest.mark.subprocess
def test_ray_extraction_writes_the_files_of_one_process(cluster, tmp_path):
    """5 images in shards of 2, by 2 workers; both outputs are named feats.h5 (the joined file
    names its shards' folder). The shards, the joined file and the manifest are the same
    bytes."""
    (tmp_path / "images").mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / "images" / f"{name}.png")
    args = ["extract", "images", "--backbone", "efficientnet-lite0", *SMALL, "--shard-size", "2",
            "--device", "cpu", "--quiet", "-o"]
    alone = cli_in(*args, "alone/feats.h5", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    on_ray = cli_in(*args, "ray/feats.h5", "--ray", "--ray-workers", "2", cwd=tmp_path)
    assert on_ray.returncode == 0, on_ray.stderr
    assert on_ray.stdout == alone.stdout.replace("alone/", "ray/")
    shards = sorted(path.name for path in (tmp_path / "alone/feats.h5.shards").iterdir())
    assert shards == sorted(path.name for path in (tmp_path / "ray/feats.h5.shards").iterdir())
    assert shards == ["lock", "manifest.json", *(f"shard-0000{n}.h5" for n in range(3))]
    for name in ["feats.h5", *(f"feats.h5.shards/{shard}" for shard in shards[1:])]:
        assert (tmp_path / "ray" / name).read_bytes() == (
            tmp_path / "alone" / name).read_bytes(), name
    # +1M's way: only the images in some query's top 2, on Ray too
    assert cli_in("shortlist", "--features", "alone/feats.h5", "-k", "3", "-o", "s.npz",
                  cwd=tmp_path).returncode == 0
    for run, ray in (("alone", []), ("ray", ["--ray", "--ray-workers", "2"])):
        result = cli_in(*args, f"{run}/heads.h5", "--only-shortlisted", "s.npz", "--head", "2",
                        *ray, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    for name in ["heads.h5", "heads.h5.shards/manifest.json", "heads.h5.shards/shard-00000.h5"]:
        assert (tmp_path / "ray" / name).read_bytes() == (
            tmp_path / "alone" / name).read_bytes(), name
    nn = [np.load(tmp_path / run / "heads.nn.npz") for run in ("alone", "ray")]
    assert all(np.array_equal(nn[0][key], nn[1][key]) for key in nn[0].files)



def test_ray_without_ray_installed_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = cli_in(*ARGS, "-o", "r.csv", "--ray", cwd=folder)
    assert result.returncode == 1
    assert result.stderr == ("elvis: error: --ray needs Ray, which is not installed: pip install "
                             "'elvis-cli[ray]'\n")
    assert not (folder / "r.csv").exists()


def test_ray_workers_go_with_ray(folder):
    result = cli_in(*ARGS, "-o", "r.csv", "--ray-workers", "2", cwd=folder)
    assert result.returncode == 1
    assert result.stderr == "elvis: error: --ray-workers goes with --ray\n"


def test_extract_to_an_address_where_nothing_answers_writes_nothing(tmp_path):
    write_views(tmp_path / "images")
    result = cli_in("extract", "images", "-o", "f.h5", "--ray", "127.0.0.1:1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("elvis: error: --ray 127.0.0.1:1: no Ray cluster there")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images"]


def test_an_address_where_nothing_answers_is_refused_at_once():
    """Ray itself retries such an address for minutes."""
    from types import SimpleNamespace

    from elvis_cli.util.errors import InputError
    from elvis_cli.util.ray_cluster import RayExecutor, _connect

    calls = []
    ray = SimpleNamespace(init=lambda **options: calls.append(options))
    with pytest.raises(InputError, match=r"--ray 127\.0\.0\.1:1: no Ray cluster there"):
        _connect(ray, RayExecutor(address="127.0.0.1:1"))
    assert calls == []
