"""AMES: scores against the plain reference, the authors' checkpoint layout, official names,
and the re-ranking engine and CLI."""

import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from elvis_cli.model.ames import Ames, AmesConfig
from elvis_cli.model.checkpoints import default_checkpoint_for, load_checkpoint
from elvis_cli.model.elvis_reranker import AmesReranker
from elvis_cli.model.registry import load_reranker
from elvis_cli.retrieval.config import RerankConfig
from elvis_cli.retrieval.rerank import PairScorer
from elvis_cli.util.errors import ModelMismatchError, OfflineError
from tests.conftest import CANDIDATES, STORE_DIM
from tests.helpers import random_model, reference_pair_scores, run_cli, write_views
from tests.reference_ames import reference_ames_score

SMALL_AMES = {"layers": 2, "feedforward_dim": 64}


def random_ames(dim: int = STORE_DIM, seed: int = 0, binarised: bool = False) -> Ames:
    """An AMES with random weights large enough to give varied scores."""
    torch.manual_seed(seed)
    model = Ames(AmesConfig(descriptor_dim=dim, binarised=binarised, **SMALL_AMES)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def pairs(batch: int, m: int, n: int, dim: int, seed: int = 1):
    """Random descriptor sets with padding (zeroed, as the engine hands them over) on both
    sides, a different amount per pair."""
    generator = torch.Generator().manual_seed(seed)
    src, tgt = (torch.randn(batch, count, dim, generator=generator) for count in (m, n))
    src_pad = torch.arange(m)[None, :] >= torch.tensor([m, m - 3, 2])[:batch, None]
    tgt_pad = torch.arange(n)[None, :] >= torch.tensor([n - 1, n, 1])[:batch, None]
    src[src_pad], tgt[tgt_pad] = 0.0, 0.0
    return src, tgt, src_pad, tgt_pad


@pytest.mark.parametrize("binarised", [False, True])
def test_batched_scores_match_the_reference_with_padding_and_unequal_sizes(binarised):
    model = random_ames(dim=40, binarised=binarised)
    src, tgt, src_pad, tgt_pad = pairs(3, 9, 6, 40)
    with torch.inference_mode():
        scores = model(src, tgt, src_pad, tgt_pad)
    expected = [reference_ames_score(model.state_dict(), *pair)
                for pair in zip(src, tgt, src_pad, tgt_pad, strict=True)]
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-4)
    assert np.ptp(expected) > 0.03  # varied scores, far beyond the tolerance


def test_one_pair_at_a_time_and_a_broadcast_query_give_the_batched_scores():
    model = random_ames()
    src, tgt, src_pad, tgt_pad = pairs(3, 8, 11, STORE_DIM)
    with torch.inference_mode():
        query = model.embed(src[:1], src_pad[:1])
        broadcast = model.score(query, model.embed(tgt, tgt_pad))
        single = [model(src[:1], tgt[i : i + 1], src_pad[:1], tgt_pad[i : i + 1])
                  for i in range(3)]
        batched = model(src[:1].expand(3, -1, -1), tgt, src_pad[:1].expand(3, -1), tgt_pad)
    np.testing.assert_allclose(broadcast.numpy(), torch.cat(single).numpy(), atol=1e-5)
    np.testing.assert_allclose(batched.numpy(), broadcast.numpy(), atol=1e-5)


def test_binarised_files_hold_the_bits_the_model_would_compute():
    model = random_ames(dim=40, binarised=True)
    src, tgt, _, _ = pairs(1, 6, 5, 40)
    itq = model.remap_local[0].W
    bits = [torch.sign(nn.functional.normalize(x, dim=-1) @ itq) for x in (src, tgt)]
    with torch.inference_mode():
        np.testing.assert_allclose(model(*bits).numpy(), model(src, tgt).numpy(), atol=1e-6)
    assert bits[0].shape[-1] == 128


def authors_state(dim: int, layers: int = 2, feedforward: int = 64) -> dict[str, torch.Tensor]:
    """A state dict in the authors' key layout, built from torch's own modules as their
    matcher and decoder layers name them (nn.MultiheadAttention, batch_first)."""
    torch.manual_seed(3)
    layer = lambda: nn.ModuleDict({  # noqa: E731
        "self_attn": nn.MultiheadAttention(128, 2, batch_first=True),
        "cross_attn": nn.MultiheadAttention(128, 2, batch_first=True),
        "linear1": nn.Linear(128, feedforward), "linear2": nn.Linear(feedforward, 128),
        "norm1": nn.LayerNorm(128), "norm2": nn.LayerNorm(128), "norm3": nn.LayerNorm(128)})
    authors = nn.ModuleDict({
        "remap_local": nn.Sequential(nn.Linear(dim, 128), nn.LayerNorm(128)),
        "decoder": nn.ModuleDict({"layers": nn.ModuleList(layer() for _ in range(layers))}),
        "classifier": nn.Linear(128, 1)})
    state = {key: value.normal_(0.0, 0.3) for key, value in authors.state_dict().items()}
    state["mtc_token"] = torch.randn(128)
    return state


def test_a_checkpoint_in_the_authors_layout_loads_and_scores_like_the_reference(tmp_path):
    state = authors_state(dim=24, layers=3, feedforward=48)
    torch.save({"state": state, "epoch": 3}, tmp_path / "authors.pt")
    checkpoint = load_checkpoint(tmp_path / "authors.pt")
    config = checkpoint.model.config
    assert checkpoint.architecture == "ames" and checkpoint.descriptor_dim == 24
    assert (config.layers, config.feedforward_dim, config.binarised) == (3, 48, False)
    src, tgt, src_pad, tgt_pad = pairs(2, 7, 9, 24)
    with torch.inference_mode():
        scores = checkpoint.model(src, tgt, src_pad, tgt_pad)
    expected = [reference_ames_score(state, *pair)
                for pair in zip(src, tgt, src_pad, tgt_pad, strict=True)]
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-4)


def test_official_ames_offline_give_one_line_errors_naming_their_url(tmp_path, monkeypatch):
    monkeypatch.setenv("ELVIS_CACHE", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    for name in ("dinov2_ames", "dinov2_ames_dist", "cvnet_ames", "cvnet_ames_dist"):
        with pytest.raises(OfflineError) as error:
            load_checkpoint(name)
        message = str(error.value)
        assert "\n" not in message and "--checkpoint" in message
        assert f"sumapave/public/ames/networks/{name}.pt" in message


def unreachable(request, timeout):
    raise urllib.error.URLError("Network is unreachable")


def test_official_ames_from_the_cache_take_the_authors_fusion(tmp_path, monkeypatch):
    monkeypatch.setenv("ELVIS_CACHE", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    state = authors_state(dim=24)
    state["remap_local.0.W"] = torch.randn(24, 128)  # the "dist" layout: ITQ, Linear, LayerNorm
    for key in ("weight", "bias"):
        state[f"remap_local.2.{key}"] = state.pop(f"remap_local.1.{key}")
        state[f"remap_local.1.{key}"] = torch.randn((128, 128) if key == "weight" else 128)
    del state["remap_local.0.weight"], state["remap_local.0.bias"]
    torch.save({"state": state}, tmp_path / "checkpoints" / "dinov2_ames_dist.pt")
    checkpoint = load_checkpoint("dinov2_ames_dist")
    assert checkpoint.model.config.binarised and checkpoint.backbone == {"name": "dinov2"}
    assert (checkpoint.fusion.lam, checkpoint.fusion.temperature) == (0.35, 0.10)
    assert default_checkpoint_for({"name": "dinov2"}, "ames") == "dinov2_ames"


def test_the_engine_scores_ames_like_the_reference(stores):
    queries, gallery = stores
    model = random_ames(seed=5)
    config = RerankConfig(device="cpu", cache_images=3, read_images=2, workers=2)
    scores = PairScorer(AmesReranker(model), queries, gallery, config).score(CANDIDATES)
    expected = reference_pair_scores(model, queries, gallery, CANDIDATES, config.num_local,
                                     reference=reference_ames_score)
    assert np.array_equal(np.isnan(scores), np.isnan(expected))
    np.testing.assert_allclose(scores, expected, atol=1e-4, equal_nan=True)


def test_each_model_refuses_the_others_checkpoint(stores, tmp_path):
    _, gallery = stores
    torch.save({"state": random_ames().state_dict()}, tmp_path / "ames.pt")
    torch.save({"state": random_model(dim=STORE_DIM).state_dict()}, tmp_path / "elvis.pt")
    with pytest.raises(ModelMismatchError, match="AMES weights, not ELViS's: use --model ames"):
        load_reranker("elvis", gallery, tmp_path / "ames.pt")
    with pytest.raises(ModelMismatchError, match="holds ELViS weights, not AMES's"):
        load_reranker("ames", gallery, tmp_path / "elvis.pt")
    reranker = load_reranker("ames", gallery, tmp_path / "ames.pt", lam=0.2)
    assert isinstance(reranker, AmesReranker) and reranker.fusion.lam == 0.2


def test_rerank_command_takes_model_ames(stores, tmp_path):
    queries, gallery = stores
    torch.save({"state": random_ames(seed=2).state_dict()}, tmp_path / "ames.pt")
    code, _, err = run_cli("rerank", "--queries", queries.path, "--gallery", gallery.path,
                           "--model", "ames", "--checkpoint", tmp_path / "ames.pt",
                           "--shortlist", "3", "-o", tmp_path / "out.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "out.csv")
    assert table["raw_score"].notna().sum() == 3 * 4  # the top 3 of each of the 4 queries


def test_train_model_ames_writes_an_ames_checkpoint_that_reranks(tmp_path):
    """`elvis train --model ames`: the same data, loss and validation as ELViS; the best
    round and its fusion are saved in the official format and load as AMES."""
    write_views(tmp_path / "photos")
    code, _, err = run_cli("train", tmp_path / "photos", "-o", tmp_path / "ames.pt", "--model",
                           "ames", "--rounds", "1", "--steps", "2", "--views", "2",
                           "--batch-pairs", "4", "--image-size", "128", "--keep-local", "16",
                           "--device", "cpu")
    assert code == 0, err
    checkpoint = load_checkpoint(tmp_path / "ames.pt")
    assert checkpoint.architecture == "ames" and checkpoint.model.config == AmesConfig(
        descriptor_dim=checkpoint.descriptor_dim)
    assert checkpoint.backbone["name"] == "efficientnet-lite0"
    assert checkpoint.info["steps_per_round"] == 2 and checkpoint.fusion.lam <= 1.0
    code, _, err = run_cli("train", tmp_path / "photos", "-o", tmp_path / "x.pt", "--model",
                           "chamfer")
    assert code == 1 and "train fits elvis or ames, not 'chamfer'" in err
