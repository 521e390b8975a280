"""Functions shared by several test files. Test files import only from here, `conftest`
(constants and fixtures), `reference_elvis` and `reference_ames` (the plain references of
the two models) and `kill_runner` (a subprocess entry point); never from one another."""

import contextlib
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from elvis_cli.features.layout import shard_path
from elvis_cli.features.store import FeatureStore
from elvis_cli.features.writer import finalize, write_shard
from elvis_cli.model.checkpoints import save_checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig
from elvis_cli.model.reranker import Fusion
from tests.reference_elvis import reference_score

REPO = Path(__file__).resolve().parent.parent


# --- feature files and models ---------------------------------------------------------------


def write_store(path: Path, rng: np.random.Generator, count: int, stored: int, real: list[int],
                dim: int = 48) -> FeatureStore:
    """A joined features file whose image i has real[i] descriptors, the rest padding."""
    rows = np.zeros((count, stored, 5 + dim), dtype=np.float32)
    descriptors = rng.standard_normal((count, stored, dim))
    rows[..., 5:] = descriptors / np.linalg.norm(descriptors, axis=-1, keepdims=True)
    rows[..., 5:] += 50.0 * (np.arange(stored)[None, :, None] >= np.array(real)[:, None, None])
    rows[..., 3] = np.arange(stored)[None, :] >= np.array(real)[:, None]  # padding flag
    names = [f"img{i}.jpg" for i in range(count)]
    write_shard(shard_path(path, 0), rows, np.zeros((count, 3), np.float32), names, names,
                np.ones((count, 2), np.int32))
    finalize(path, [shard_path(path, 0)], {"name": "test"}, path.parent)
    return FeatureStore.open(path)


def random_model(dim: int = 48, seed: int = 0, dust_bin: float = 0.5, scale: float = 0.3):
    """An ELViS with random weights large enough to give varied scores."""
    torch.manual_seed(seed)
    model = Elvis(ElvisConfig(descriptor_dim=dim)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, scale)
        model.dust_bin.fill_(dust_bin)
    return model


def random_checkpoint(path: Path, dim: int, backbone: dict) -> Path:
    """A checkpoint of default-initialised weights for `backbone`'s settings."""
    torch.manual_seed(0)
    save_checkpoint(path, Elvis(ElvisConfig(descriptor_dim=dim)), backbone, Fusion(0.5, 0.1))
    return path


def reference_pair_scores(model, queries: FeatureStore, gallery: FeatureStore, candidates,
                          num_local, reference=reference_score) -> np.ndarray:
    """The plain reference's raw score of every (query, candidate) pair; NaN where row < 0.
    `reference(state, src, tgt, src_pad, tgt_pad)`: ELViS's, or another model's."""
    state = model.state_dict()
    expected = np.full(candidates.shape, np.nan)
    src_local, tgt_local = (min(num_local or store.num_local, store.num_local)
                            for store in (queries, gallery))
    for (q, position), row in np.ndenumerate(candidates):
        if row >= 0:
            src, src_pad = queries.local_descriptors([q], src_local)
            tgt, tgt_pad = gallery.local_descriptors([row], tgt_local)
            src, tgt = torch.from_numpy(src[0]), torch.from_numpy(tgt[0])
            src[src_pad[0]] = 0.0
            tgt[tgt_pad[0]] = 0.0
            expected[q, position] = reference(state, src, tgt, torch.from_numpy(src_pad[0]),
                                              torch.from_numpy(tgt_pad[0]))
    return expected


# --- images -----------------------------------------------------------------------------------


def photos() -> dict[str, np.ndarray]:
    return {"astronaut": skimage.data.astronaut(), "cat": skimage.data.chelsea(),
            "coffee": skimage.data.coffee(), "rocket": skimage.data.rocket()}


def write_views(folder: Path) -> list[str]:
    """Two crops of each photo, so every image has a true match."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, pixels in photos().items():
        h, w = pixels.shape[:2]
        for i, crop in enumerate((pixels[: 3 * h // 4, : 3 * w // 4], pixels[h // 4 :, w // 4 :])):
            Image.fromarray(crop).save(folder / f"{name}_{i}.jpg")
            names.append(f"{name}_{i}")
    return names


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares a huge size; only its header is valid (a decompression bomb probe)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


# --- the command in a process of its own ------------------------------------------------------


def elvis(*args, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m elvis_cli ARGS` in `cwd` as a user runs it, on this checkout's code, one
    thread, its checkpoint cache in `cwd`/cache. Tests that call it are marked `subprocess`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
           "ELVIS_CACHE": str(cwd / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "elvis_cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def cli_in(*args: object, cwd: Path, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """`elvis ARGS` as `elvis()` runs it (same folder, cache and environment), but in this
    process (cli.main, the console script's code) without a new interpreter's seconds of
    imports: exit code, stdout and stderr."""
    saved_env, folder = dict(os.environ), os.getcwd()
    os.environ.update({"ELVIS_CACHE": str(Path(cwd) / "cache"), **(env or {})})
    try:
        os.chdir(cwd)
        code, out, err = run_cli(*args)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(folder)
    return subprocess.CompletedProcess(list(args), code, out, err)


def run_cli(*args: object) -> tuple[int, str, str]:
    """`elvis ARGS` in this process, here, as the console script runs it (cli.main): exit
    code, stdout and stderr; never a traceback."""
    from elvis_cli.cli import app as cli

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_warning_display = sys.argv, warnings.showwarning  # main() replaces it
    sys.argv = ["elvis", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as ended:
        code = ended.code or 0
    finally:
        sys.argv, warnings.showwarning = saved_argv, saved_warning_display
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return code, out.getvalue(), err.getvalue()


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1 and a single `elvis: error:` line on stderr holding every fragment; that
    line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("elvis: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- benchmarks and results pages -------------------------------------------------------------


def write_revisitop(root: Path, queries: list[str], gallery: list[str], gnd: list[dict]) -> None:
    """A benchmark in the revisitop layout: `gnd_<name>.pkl` in `root` (images in root/jpg)."""
    import pickle

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"gnd_{root.name}.pkl", "wb") as handle:
        pickle.dump({"imlist": gallery, "qimlist": queries, "gnd": gnd}, handle)


def loaded_images_in_chromium(page: Path, browser: str) -> tuple[int, int]:
    """(images loaded, images on the page) as headless Chromium counts them after loading
    `page` from disk (the page's own script writes them into #images-loaded)."""
    import re

    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    found = re.search(r'id="images-loaded" data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert found, dom[-2000:]
    return int(found.group(1)), int(found.group(2))


def write_globals(path: Path, global_desc: np.ndarray) -> Path:
    """A joined features file whose images have these global descriptors (one local row each,
    not read by global search): galleries of thousands, written in milliseconds."""
    count = len(global_desc)
    names = [f"img{i}.jpg" for i in range(count)]
    write_shard(shard_path(path, 0), np.zeros((count, 1, 9), np.float32), global_desc, names,
                names, np.ones((count, 2), np.int32))
    finalize(path, [shard_path(path, 0)], {"name": "test"}, path.parent)
    return path


def clustered_rows(count: int, dim: int, seed: int, clusters: int = 50) -> np.ndarray:
    """L2-normalised rows around `clusters` random centres: what global descriptors of a
    gallery of a few landmarks look like to an index."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    rows = centres[rng.integers(clusters, size=count)] + 0.6 * rng.standard_normal((count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def ray_workers_running(task: str) -> list[int]:
    """The process ids of this process's local Ray cluster's workers (children of its raylet)
    running a task of function `task` now, which Ray titles `ray::TASK`; read from /proc."""
    title, found = f"ray::{task}\0".encode(), []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title)
                    and _parent(_parent(int(entry.name))) == os.getpid()):
                found.append(int(entry.name))
        except (OSError, ValueError):  # it ended meanwhile
            continue
    return found


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("\nPPid:")[1].split()[0])
