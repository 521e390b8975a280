"""Faults during extraction: SIGKILL at chosen moments, a second writer, damaged shards, a full
disk. After each, the same command finishes the job and the features are bitwise equal to an
uninterrupted run: nothing finished is lost and nothing damaged is kept."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
from PIL import Image

from elvis_cli.features.extraction import ExtractConfig, extract_features
from elvis_cli.features.layout import shard_path, shards_dir
from elvis_cli.features.store import FeatureStore
from elvis_cli.util.atomic import atomic_folder
from elvis_cli.util.errors import DiskFullError, InputError
from elvis_cli.util.lock import exclusive_lock
from tests.helpers import REPO, elvis

OPTIONS = {"image_size": 64, "num_local": 16, "local_layer": 5}
CONFIG = ExtractConfig(backbone_options=OPTIONS, device="cpu", batch_size=2, shard_size=2)
CLI_OPTIONS = [
    *(f"--backbone-option={key}={value}" for key, value in OPTIONS.items()),
    "--device=cpu", "--batch-size=2", "--shard-size=2", "--quiet",
]
NUM_GOOD = 6  # and one unreadable file: 7 images in 4 shards


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "images"
    folder.mkdir()
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket()]
    for index in range(NUM_GOOD):
        pixels = photos[index % 4][:: 2 + index % 2, ::3]  # a few shapes, a few batch groups
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"img{index}.png")
    (folder / "img3b.jpg").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> dict:
    """An uninterrupted run, done in this process."""
    output = tmp_path_factory.mktemp("reference") / "feats.h5"
    extract_features(images, output, CONFIG, progress=False)
    return contents(output)


def contents(path: Path) -> dict:
    with FeatureStore.open(path) as store:
        return {"paths": store.paths, "ids": store.ids, "sizes": store.sizes,
                "global": store.global_descriptors(),
                "local": store.read_local(range(store.num_images))}


def assert_bitwise_equal(output: Path, reference: dict) -> None:
    found = contents(output)
    assert found["paths"] == reference["paths"] and found["ids"] == reference["ids"]
    for key in ("sizes", "global", "local"):
        assert found[key].tobytes() == reference[key].tobytes(), key


def run_killed(point: str, nth: int, images: Path, output: Path, action: str = "kill",
               **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "ELVIS_PAUSED": str(output.parent / "paused")}
    command = [sys.executable, "-m", "tests.kill_runner", point, str(nth), action,
               "extract", str(images), "-o", str(output), *CLI_OPTIONS]
    return subprocess.Popen(command, env=env, cwd=output.parent, stderr=subprocess.PIPE,
                            text=True, **popen)


def assert_nothing_half_written(output: Path) -> None:
    """Every shard the manifest calls done is intact; no other file looks like a finished one."""
    folder = shards_dir(output)
    if not folder.exists():
        return
    manifest = json.loads((folder / "manifest.json").read_text())
    for index, shard in enumerate(manifest["shards"]):
        if shard["done"]:
            with h5py.File(shard_path(output, index), "r") as file:
                assert len(file["paths"]) == len(shard["images"]) - len(shard["failures"])
    if output.exists():
        with FeatureStore.open(output) as store:
            assert store.num_images == NUM_GOOD


# (point, nth): decoding the 4th image, the 2nd forward pass, half-way through the 2nd shard's
# datasets, just before and just after the 3rd shard's rename, the 2nd manifest update, while
# joining, before and after the joined file's rename.
KILL_POINTS = [("decode", 4), ("model", 2), ("shard-write", 8), ("shard-rename", 3),
               ("shard-renamed", 3), ("manifest", 2), ("finalize-write", 2),
               ("finalize-rename", 1), ("finished", 1)]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize(("point", "nth"), KILL_POINTS)
def test_sigkill_then_rerun_gives_identical_features(point, nth, images, reference, tmp_path):
    output = tmp_path / "feats.h5"
    killed = run_killed(point, nth, images, output)
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr  # the kill really happened
    assert_nothing_half_written(output)
    report = extract_features(images, output, CONFIG, progress=False)
    assert report.num_extracted + report.num_resumed == NUM_GOOD
    assert [name for name, _ in report.failures] == ["img3b.jpg"]
    assert not list(shards_dir(output).glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert_bitwise_equal(output, reference)


@pytest.mark.slow
@pytest.mark.subprocess
def test_kill_resume_kill_resume_through_the_command(images, reference, tmp_path):
    """Killed three times in a row at different stages; `elvis extract` run again finishes."""
    output = tmp_path / "feats.h5"
    for point, nth in [("shard-write", 3), ("shard-renamed", 2), ("finalize-rename", 1)]:
        killed = run_killed(point, nth, images, output)
        killed.communicate(timeout=300)
        assert killed.returncode == -signal.SIGKILL, point
        assert_nothing_half_written(output)
    result = elvis("extract", str(images), "-o", str(output), *CLI_OPTIONS, cwd=tmp_path)
    assert result.returncode == 3, result.stderr  # finished; the unreadable image is named
    assert "elvis: skipped img3b.jpg" in result.stderr and "Traceback" not in result.stderr
    assert_bitwise_equal(output, reference)


@pytest.mark.subprocess
def test_second_writer_is_refused_and_a_killed_writer_does_not_block(images, reference,
                                                                      tmp_path):
    output = tmp_path / "feats.h5"
    writer = run_killed("shard-renamed", 2, images, output, action="pause")
    paused = tmp_path / "paused"
    deadline = time.monotonic() + 120
    while not paused.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert paused.exists(), writer.stderr.read() if writer.poll() is not None else "timeout"
    try:
        result = elvis("extract", str(images), "-o", str(output), *CLI_OPTIONS, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"elvis: error: {output} is being written by another process (pid {writer.pid}); "
            "wait for it to finish or stop it"]
        with pytest.raises(InputError, match="being written by another process"):
            extract_features(images, output, CONFIG, progress=False)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert (shards_dir(output) / "lock").exists()  # left behind by the dead writer: harmless
    extract_features(images, output, CONFIG, progress=False)
    assert_bitwise_equal(output, reference)


def test_lock_is_exclusive_within_a_process_too(tmp_path):
    with (
        exclusive_lock(tmp_path / "lock", "thing"),
        pytest.raises(InputError, match="thing is being written"),
        exclusive_lock(tmp_path / "lock", "thing"),
    ):
        pass
    with exclusive_lock(tmp_path / "lock", "thing"):  # released on leaving the block
        pass


def test_a_truncated_shard_is_named_on_opening(images, tmp_path):
    output = tmp_path / "feats.h5"
    extract_features(images, output, CONFIG, progress=False)
    truncated = shard_path(output, 1)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(InputError, match=r"shard-00001\.h5 is damaged \(\d+ bytes, \d+ expected"):
        FeatureStore.open(output)


def test_damaged_shards_are_named_and_only_they_are_redone(images, reference, tmp_path):
    output = tmp_path / "feats.h5"
    extract_features(images, output, CONFIG, progress=False)
    stamps = {i: shard_path(output, i).stat().st_mtime_ns for i in range(4)}
    truncated = shard_path(output, 1)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    flipped = shard_path(output, 3)
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes: only the checksum sees it
    flipped.write_bytes(bytes(data))

    report = extract_features(images, output, CONFIG, progress=False)
    assert [entry.split()[0] for entry in report.repaired] == ["shard-00001.h5", "shard-00003.h5"]
    assert "checksum mismatch" in report.repaired[1]
    assert (report.num_extracted, report.num_resumed) == (3, 3)  # shard 3 holds one image
    for index in (0, 2):
        assert shard_path(output, index).stat().st_mtime_ns == stamps[index]
    assert_bitwise_equal(output, reference)


def test_a_missing_shard_is_named_and_redone(images, reference, tmp_path):
    output = tmp_path / "feats.h5"
    extract_features(images, output, CONFIG, progress=False)
    shard_path(output, 2).unlink()
    with pytest.raises(InputError, match=r"missing shard .*shard-00002\.h5"):
        FeatureStore.open(output)
    assert extract_features(images, output, CONFIG, progress=False).repaired == [
        "shard-00002.h5 missing"]
    assert_bitwise_equal(output, reference)


def test_disk_full_while_writing_a_shard_keeps_finished_work(images, reference, tmp_path,
                                                             monkeypatch):
    """ENOSPC injected half-way through writing the 2nd shard's bytes (runs everywhere)."""
    original = Path.write_bytes

    def full_disk(self, data):
        if ".shard-00001.h5." in self.name:
            original(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    output = tmp_path / "feats.h5"
    with pytest.raises(DiskFullError, match=r"no space left .*shard-00001\.h5; free some space"):
        extract_features(images, output, CONFIG, progress=False)
    assert sorted(p.name for p in shards_dir(output).iterdir()) == [
        "lock", "manifest.json", "shard-00000.h5"]
    assert not output.exists()
    monkeypatch.undo()
    report = extract_features(images, output, CONFIG, progress=False)
    assert (report.num_extracted, report.num_resumed) == (4, 2)
    assert_bitwise_equal(output, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KiB tmpfs mounted for the test; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.subprocess
def test_real_full_disk_ends_with_one_line_and_resumes(images, reference, small_disk):
    output = small_disk / "feats.h5"
    result = elvis("extract", str(images), "-o", str(output), *CLI_OPTIONS, cwd=small_disk)
    assert result.returncode == 4, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("elvis: error: no space left on the device while writing ")
    assert line.endswith("re-run the same command: finished shards are kept")
    assert_nothing_half_written(output)
    leftovers = [p.name for p in shards_dir(output).iterdir()]
    assert not [name for name in leftovers if name.endswith(".tmp")]
    manifest = shards_dir(output) / "manifest.json"
    shards = json.loads(manifest.read_text())["shards"] if manifest.exists() else []
    finished = sum(len(shard["images"]) - len(shard["failures"]) for shard in shards
                   if shard["done"])
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    report = extract_features(images, output, CONFIG, progress=False)
    assert report.num_resumed == finished  # the shards finished before the disk filled
    assert report.num_extracted + report.num_resumed == NUM_GOOD
    assert_bitwise_equal(output, reference)


def test_a_folder_written_whole_names_itself_on_a_full_disk_and_keeps_the_old_one(tmp_path):
    (tmp_path / "page").mkdir()
    (tmp_path / "page" / "index.html").write_text("earlier")
    with (pytest.raises(DiskFullError, match=r"while writing .*page$"),
          atomic_folder(tmp_path / "page") as folder):
        (folder / "index.html").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert [path.name for path in tmp_path.iterdir()] == ["page"]
    assert (tmp_path / "page" / "index.html").read_text() == "earlier"
