"""Score parity: the production ELViS against the plain reference of ELVIS_SPEC §1."""

import copy
import math

import pytest
import torch

from elvis_cli.model.elvis import Elvis, ElvisConfig, _runs_compiled
from elvis_cli.model.reranker import Embedded
from elvis_cli.model.vote_confidence import ERF_RANGE, confidence_sum, vote_function_parameters
from tests.helpers import random_model
from tests.reference_elvis import reference_score, reference_scores

TOLERANCE = 1e-4


def descriptors(batch: int, count: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(batch, count, dim, generator=generator)
    return torch.nn.functional.normalize(rows, dim=-1)


def assert_matches_reference(model, src, tgt, src_mask=None, tgt_mask=None):
    """Both transport paths: inference takes the compiled CPU loop, a graph for autograd
    (training) takes the torch ops that CUDA runs too."""
    with torch.no_grad():
        scores = model(src, tgt, src_mask, tgt_mask)
    with torch.enable_grad():
        torch_path = model(src, tgt, src_mask, tgt_mask).detach()
    state = model.state_dict()
    for b in range(src.shape[0]):
        expected = reference_score(
            state, src[b], tgt[b],
            None if src_mask is None else src_mask[b],
            None if tgt_mask is None else tgt_mask[b])
        for path, values in (("compiled", scores), ("torch", torch_path)):
            assert abs(float(values[b]) - expected) <= TOLERANCE, (path, b, float(values[b]),
                                                                   expected)
    return scores


def test_batched_reference_scores_each_pair_as_alone():
    """The benchmark times the reference in batches: the batch must not mix pairs."""
    state = random_model(seed=60).state_dict()
    src, tgt = descriptors(3, 11, 48, 61), descriptors(3, 13, 48, 62)
    src_pad, tgt_pad = torch.zeros(3, 11, dtype=torch.bool), torch.zeros(3, 13, dtype=torch.bool)
    src_pad[1, 6:], tgt_pad[2, 1:] = True, True
    batched = reference_scores(state, src, tgt, src_pad, tgt_pad)
    alone = [reference_score(state, src[b], tgt[b], src_pad[b], tgt_pad[b]) for b in range(3)]
    torch.testing.assert_close(batched, torch.tensor(alone, dtype=torch.float64), rtol=0,
                               atol=1e-9)
    assert len(set(alone)) == 3


def test_official_parameter_count_and_names():
    model = Elvis()
    assert sum(p.numel() for p in model.parameters()) == 115_604
    assert set(model.state_dict()) >= {"remap_local.0.weight", "remap_local.1.bias", "dust_bin",
                                        "dust_bin_mlp.2.weight", "f.3.bias", "g.2.weight"}


def test_single_pair_matches_reference():
    model = random_model()
    assert_matches_reference(model, descriptors(1, 30, 48, 1), descriptors(1, 30, 48, 2))


def test_batch_with_unequal_sizes_matches_reference():
    model = random_model(seed=3)
    assert_matches_reference(model, descriptors(5, 23, 48, 4), descriptors(5, 41, 48, 5))


@pytest.mark.parametrize(("m", "n"), [(1, 1), (3, 5), (4, 4), (5, 3), (9, 2)])
def test_small_sizes_match_reference(m, n):
    """Row counts below, at and past the compiled loop's blocks of four."""
    model = random_model(seed=40 + m)
    assert_matches_reference(model, descriptors(2, m, 48, m), descriptors(2, n, 48, 50 + n))


@pytest.mark.parametrize("side", ["src", "tgt", "both"])
def test_padding_in_either_image_matches_reference(side):
    model = random_model(seed=6)
    src, tgt = descriptors(4, 20, 48, 7), descriptors(4, 26, 48, 8)
    src_mask = torch.zeros(4, 20, dtype=torch.bool)
    tgt_mask = torch.zeros(4, 26, dtype=torch.bool)
    if side in ("src", "both"):
        src_mask[0, 12:] = True
        src_mask[2, 1:] = True  # a single real descriptor
    if side in ("tgt", "both"):
        tgt_mask[1, 5:] = True
        tgt_mask[3, :] = True  # no real descriptor at all
    assert_matches_reference(model, src, tgt, src_mask, tgt_mask)


def test_padding_between_real_descriptors_matches_reference():
    """Files store padding last, which the compiled loop reads without a copy; padding
    anywhere else is put last first, with the same scores."""
    model = random_model(seed=9)
    src, tgt = descriptors(3, 20, 48, 10), descriptors(3, 26, 48, 11)
    src_mask = torch.zeros(3, 20, dtype=torch.bool)
    tgt_mask = torch.zeros(3, 26, dtype=torch.bool)
    src_mask[0, ::3] = True
    tgt_mask[1, 2:9] = True
    tgt_mask[2, 0] = True
    scattered = assert_matches_reference(model, src, tgt, src_mask, tgt_mask)
    order_src = torch.argsort(src_mask.to(torch.int8), dim=1, stable=True)
    order_tgt = torch.argsort(tgt_mask.to(torch.int8), dim=1, stable=True)
    with torch.no_grad():
        last = model(src.gather(1, order_src[..., None].expand_as(src)),
                     tgt.gather(1, order_tgt[..., None].expand_as(tgt)),
                     src_mask.gather(1, order_src), tgt_mask.gather(1, order_tgt))
    torch.testing.assert_close(scattered, last, rtol=0, atol=0)


def test_padding_changes_the_score():
    model = random_model(seed=9)
    src, tgt = descriptors(1, 20, 48, 10), descriptors(1, 20, 48, 11)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 10:] = True
    with torch.no_grad():
        assert not torch.allclose(model(src, tgt), model(src, tgt, mask, None))


@pytest.mark.parametrize("dust_bin", [-30.0, -5.0, 0.0, 5.0, 40.0])
def test_extreme_dust_bin_matches_reference(dust_bin):
    """Large |dust_bin| leaves the linear-domain range: the log-domain path must take over."""
    model = random_model(seed=12, dust_bin=dust_bin)
    src_mask = torch.zeros(2, 18, dtype=torch.bool)
    src_mask[1, 9:] = True
    scores = assert_matches_reference(model, descriptors(2, 18, 48, 13),
                                      descriptors(2, 25, 48, 14), src_mask, None)
    assert torch.isfinite(scores).all()


def test_saturated_gains_match_reference():
    """Huge dustbin-MLP weights drive tanh to +-1 for every descriptor."""
    model = random_model(seed=15)
    with torch.no_grad():
        model.dust_bin_mlp[2].weight.mul_(1e4)
    assert_matches_reference(model, descriptors(3, 16, 48, 16), descriptors(3, 16, 48, 17))


def test_query_broadcasts_over_gallery_batch():
    model = random_model(seed=21)
    src, tgt = descriptors(1, 15, 48, 22), descriptors(6, 19, 48, 23)
    with torch.no_grad():
        broadcast = model.score(model.embed(src), model.embed(tgt))
        paired = model(src.expand(6, -1, -1), tgt)
    torch.testing.assert_close(broadcast, paired)


def test_inference_on_cpu_takes_the_compiled_loop():
    model = random_model(seed=27)
    src, tgt = model.embed(descriptors(1, 9, 48, 28)), model.embed(descriptors(2, 9, 48, 29))
    assert not _runs_compiled(src, tgt)  # parameters require grad: a graph is being built
    with torch.no_grad():
        src, tgt = model.embed(descriptors(1, 9, 48, 28)), model.embed(descriptors(2, 9, 48, 29))
    assert _runs_compiled(src, tgt)
    half = Embedded(src.descriptors.half(), src.gains.half())
    assert not _runs_compiled(half, tgt)


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_compiled_vote_confidences_match_f_in_float64(seed):
    """Step 9 of the compiled loop (its erf a Chebyshev series, LayerNorm in closed form)
    against f as torch ops in float64, over votes whose GELU inputs reach well past the
    series' range, where erf is clamped to +-1."""
    model = random_model(seed=seed, scale=1.0)
    with torch.no_grad():
        model.f[1].weight.mul_(4.0)  # LayerNorm's outputs, GELU's inputs, up to about +-15
    generator = torch.Generator().manual_seed(seed)
    votes = torch.cat([torch.rand(698, generator=generator) ** 2, torch.tensor([0.0, 1.0])])
    f = copy.deepcopy(model.f).double()
    with torch.no_grad():
        gelu_inputs = f[:2](votes.double()[:, None])
        expected = float(torch.sigmoid(f(votes.double()[:, None])).sum())
    assert float(gelu_inputs.abs().max()) > math.sqrt(2.0) * ERF_RANGE
    assert abs(confidence_sum(votes.numpy(), *vote_function_parameters(model.f))
               - expected) < 1e-9 * len(votes)


def test_gradients_are_finite():
    model = random_model(seed=24)
    model.train()
    raw = model(descriptors(2, 12, 48, 25), descriptors(2, 14, 48, 26))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model.logit(raw), torch.tensor([1.0, 0.0]))
    loss.backward()
    assert all(math.isfinite(float(p.grad.abs().sum())) for p in model.parameters()
               if p.grad is not None)


def test_cpu_inference_bits_do_not_depend_on_the_batch():
    """An image's embedding and a pair's score are the same bits alone or in any batch: GEMMs of
    other heights and the scalar tails of vectorised kernels round differently on some CPUs
    (sizes here are odd, so the tails fall inside an image or a pair)."""
    model = random_model(seed=41)
    src, tgt = descriptors(1, 13, 48, 42), descriptors(7, 10, 48, 43)
    tgt_mask = torch.zeros(7, 10, dtype=torch.bool)
    tgt_mask[2, 4:] = True
    with torch.inference_mode():
        query = model.embed(src)
        together = model.embed(tgt, tgt_mask)
        alone = [model.embed(tgt[i : i + 1], tgt_mask[i : i + 1]) for i in range(7)]
        for name in ("descriptors", "gains"):
            joined = torch.cat([getattr(image, name) for image in alone])
            assert getattr(together, name).numpy().tobytes() == joined.numpy().tobytes(), name
        scores = model.score(query, together)
        one_by_one = torch.cat([model.score(query, image) for image in alone])
    assert scores.numpy().tobytes() == one_by_one.numpy().tobytes()


def binarised_model(dim: int = 48, seed: int = 0) -> Elvis:
    """The authors' Matcher(binarized=True) form: ITQ (dim -> 128 bits), Linear(128, 128), LN."""
    torch.manual_seed(seed)
    model = Elvis(ElvisConfig(descriptor_dim=dim, binarised=True)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
        model.dust_bin.fill_(0.5)
    return model


def test_binarised_model_has_the_official_keys():
    state = binarised_model().state_dict()
    assert state["remap_local.0.W"].shape == (48, 128)
    assert state["remap_local.1.weight"].shape == (128, 128)
    assert state["remap_local.2.weight"].shape == state["remap_local.2.bias"].shape == (128,)
    assert "remap_local.0.weight" not in state


@pytest.mark.parametrize("signs", [False, True], ids=["float-through-itq", "stored-bits"])
def test_binarised_model_matches_reference_with_padding(signs):
    """Float descriptors go through the ITQ step; -1/+1 bits of a binarised file enter after
    it. Padding and m != n on both the compiled CPU loop and the torch ops."""
    model = binarised_model(seed=7)
    width = 128 if signs else 48
    src, tgt = descriptors(3, 17, width, 8), descriptors(3, 29, width, 9)
    if signs:
        src, tgt = torch.sign(src), torch.sign(tgt)
    src_mask, tgt_mask = torch.zeros(3, 17, dtype=torch.bool), torch.zeros(3, 29, dtype=torch.bool)
    src_mask[0, 12:], tgt_mask[1, 20:], tgt_mask[2, 3:] = True, True, True
    assert_matches_reference(model, src, tgt, src_mask, tgt_mask)


def test_stored_bits_are_the_itq_output_of_their_descriptors():
    """Scoring the bits a binarised extraction stores equals scoring the float descriptors."""
    model = binarised_model(seed=11)
    src, tgt = descriptors(2, 9, 48, 12), descriptors(2, 14, 48, 13)
    itq = model.remap_local[0].W
    bits = [torch.sign(torch.nn.functional.normalize(x, dim=-1) @ itq) for x in (src, tgt)]
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), model(*bits), rtol=0, atol=1e-5)
