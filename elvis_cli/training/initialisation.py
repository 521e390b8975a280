"""Where ELViS starts training: f counting confident votes and g calibrated on the first
pool, instead of PyTorch's random init (see each function for why)."""

from __future__ import annotations

import torch

from elvis_cli.model.elvis import Elvis


def init_vote_counting(
    model: Elvis, threshold: float = 0.05, width: float = 0.05, amplitude: float = 4.0
) -> None:
    """Start f as a soft step at `threshold`: f(v) = amplitude * t / sqrt(1 + t^2),
    t = (v - threshold) / width, so the raw score begins as a count of confident votes.

    Why not PyTorch's random init: votes lie in about 0.01-0.3, where a random f is nearly flat
    (matching and non-matching pairs get the same raw score, and training plateaus for hundreds
    of steps), and its direction is random. The parametrisation is symmetric under f -> -f with
    g mirrored, so a random start may learn "fewer confident votes = match", which fusion, where
    a larger raw score means more similar, would turn upside down.

    Closed form: with first-layer directions e = (+1 x h, -1 x h) and an orthogonal offset
    o = (+1, -1, ...), LayerNorm maps e*t + o to (e*t + o) / sqrt(1 + t^2), and since
    GELU(x) - GELU(-x) = x, reading out amplitude * e / h gives the formula above exactly.
    """
    first, norm, last = model.f[0], model.f[1], model.f[3]
    half = first.out_features // 2
    direction = torch.cat([torch.ones(half), -torch.ones(half)])
    offset = torch.tensor([1.0, -1.0]).repeat(half)
    with torch.no_grad():
        first.weight.copy_((direction / width)[:, None])
        first.bias.copy_(offset - direction * threshold / width)
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        last.weight.copy_(amplitude * direction[None] / half)
        last.bias.zero_()


def calibrate_logit(model: Elvis, raw: torch.Tensor) -> None:
    """Set g(raw) = (raw - mean) / std of the given raw scores: logit 0 between matches and
    non-matches from the first step, instead of many steps spent moving g's bias.

    Hidden units come in pairs (GELU(x) - GELU(-x) = x makes each pair linear); each pair gets
    its own scale so that the units receive different gradients and can bend g later.
    """
    first, last = model.g[0], model.g[2]
    pairs = first.out_features // 2
    scales = torch.linspace(0.5, 2.0, pairs)
    slopes = torch.cat([scales, -scales]) / raw.std().clamp_min(1e-3)
    with torch.no_grad():
        first.weight.copy_(slopes[:, None])
        first.bias.copy_(-slopes * raw.mean())
        last.weight.copy_((torch.cat([1.0 / scales, -1.0 / scales]) / pairs)[None])
        last.bias.zero_()
