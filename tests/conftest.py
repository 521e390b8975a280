"""Test-wide settings, constants and fixtures shared by several test files.

One torch thread keeps tests deterministic and immune to a busy machine. Tests that start
processes of their own are marked `subprocess` (`pytest -m "not subprocess"`: a quick inner
loop); an unmarked test that starts one fails, so the marker stays true."""

import subprocess

import numpy as np
import pytest
import torch

from tests.helpers import write_store

torch.set_num_threads(1)


# A DINOv2-with-registers of the real architecture, small enough to run in milliseconds.
TINY_DINOV2 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "patch_size": 14, "image_size": 56,
               "num_register_tokens": 4}

# DINOv3 ViT and SigLIP2 NaFlex vision towers of the real architectures, equally tiny.
TINY_DINOV3 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "patch_size": 16, "image_size": 64,
               "num_register_tokens": 4}
TINY_SIGLIP2 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "patch_size": 16, "num_patches": 16}

# `elvis` options for a backbone small enough that a command runs in seconds.
SMALL = ["--backbone-option", "image_size=64", "--backbone-option", "num_local=16"]

# Descriptor width of the `stores` fixture, and candidate lists over its 4 queries, 9 images.
STORE_DIM = 48
CANDIDATES = np.array([[3, 1, 1, 8, -1],  # a duplicate and a padded slot
                       [0, 2, 4, 5, 6],
                       [-1, -1, -1, -1, -1],  # nothing to score
                       [7, 6, 5, 0, 2]])


@pytest.fixture
def stores(tmp_path):
    """Two small feature files, queries (4 images) and gallery (9), some images mostly or
    entirely padding."""
    rng = np.random.default_rng(0)
    queries = write_store(tmp_path / "q.h5", rng, 4, 12, [12, 7, 12, 1], STORE_DIM)
    gallery = write_store(tmp_path / "g.h5", rng, 9, 14, [14, 14, 3, 14, 0, 14, 9, 14, 14],
                          STORE_DIM)
    yield queries, gallery
    queries.close()
    gallery.close()


class _UnmarkedSubprocess(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _subprocesses_need_the_marker(request, monkeypatch):
    """Starting a process from a test not marked `subprocess` fails it."""
    if request.node.get_closest_marker("subprocess"):
        return

    def refuse(self, args, *rest, **kwargs):
        raise _UnmarkedSubprocess(f"{request.node.nodeid} starts a process ({args!r}): mark it "
                                  "@pytest.mark.subprocess")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """The Hugging Face hub at a local port that refuses connections, an empty hub cache in
    tmp_path/hf, and any retry (a sleep) failing the test."""
    import socket
    import time

    import huggingface_hub.constants

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                        f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ELVIS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)

    def no_retry(seconds):
        raise AssertionError(f"slept {seconds}s: a retry")

    monkeypatch.setattr(time, "sleep", no_retry)
    yield tmp_path / "hf"
    closed.close()
