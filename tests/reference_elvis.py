"""A slow, plain ELViS forward pass written line by line from ELVIS_SPEC §1.

The projection is the plain one or the binarised one (ITQ sign bits, then Linear(128, 128)
and LayerNorm). Log-domain Sinkhorn on the augmented matrix, per-image work redone for every
pair, no batching tricks: the yardstick that the production model and re-ranking engine are checked
against. It scores one pair (reference_score) or a batch of equally sized pairs
(reference_scores), the way the authors' forward pass runs.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F


def reference_score(state: dict[str, torch.Tensor], src: torch.Tensor, tgt: torch.Tensor,
                    *pads: torch.Tensor | None, **options: Any) -> float:
    """Raw ELViS score of one pair: src (m, D), tgt (n, D), padding flags (m,), (n,); options
    as for `reference_scores` (float64 for the parity tests; benchmarks/rerank_speed.py times
    it in float32)."""
    batched = [None if pad is None else pad[None] for pad in pads]
    return float(reference_scores(state, src[None], tgt[None], *batched, **options)[0])


def reference_scores(
    state: dict[str, torch.Tensor],
    src: torch.Tensor,
    tgt: torch.Tensor,
    src_pad: torch.Tensor | None = None,
    tgt_pad: torch.Tensor | None = None,
    iterations: int = 10,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Raw ELViS scores (B,) of B pairs: src (B, m, D), tgt (B, n, D), flags (B, m), (B, n)."""
    src, tgt = src.to(dtype), tgt.to(dtype)
    sd = {k: v.to(dtype) for k, v in state.items()}
    batch, m, n = src.shape[0], src.shape[1], tgt.shape[1]
    src_pad = torch.zeros(batch, m, dtype=torch.bool) if src_pad is None else src_pad
    tgt_pad = torch.zeros(batch, n, dtype=torch.bool) if tgt_pad is None else tgt_pad

    def project(x):  # step 1
        if "remap_local.0.W" in sd:  # binarised (the authors' Matcher(binarized=True))
            itq = sd["remap_local.0.W"]  # (D, 128): ITQ bits of the L2-normalised descriptor,
            if x.shape[-1] != itq.shape[1]:  # unless x already holds them (a binarised file)
                x = torch.sign((x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ itq)
            x = F.linear(x, sd["remap_local.1.weight"], sd["remap_local.1.bias"])
            x = F.layer_norm(x, (128,), sd["remap_local.2.weight"], sd["remap_local.2.bias"],
                             1e-5)
        else:
            x = F.linear(x, sd["remap_local.0.weight"], sd["remap_local.0.bias"])
            x = F.layer_norm(x, (128,), sd["remap_local.1.weight"], sd["remap_local.1.bias"],
                             1e-5)
        return x / x.norm(dim=-1, keepdim=True)

    def gain(x):  # step 2
        h = F.gelu(F.linear(x, sd["dust_bin_mlp.0.weight"], sd["dust_bin_mlp.0.bias"]))
        return torch.tanh(F.linear(h, sd["dust_bin_mlp.2.weight"], sd["dust_bin_mlp.2.bias"]))[
            ..., 0]

    s, t = project(src), project(tgt)
    hs, ht = gain(s), gain(t)
    sim = s @ t.transpose(1, 2)  # step 3
    sim[src_pad[:, :, None] | tgt_pad[:, None, :]] = -math.inf
    aug = torch.empty(batch, m + 1, n + 1, dtype=dtype)  # step 4
    aug[:, :m, :n] = sim
    aug[:, m, :n] = ht
    aug[:, :m, n] = hs
    aug[:, m, n] = sd["dust_bin"]
    big_n = m + n  # step 5
    log_a = torch.full((m + 1,), -math.log(big_n), dtype=dtype)
    log_a[m] += math.log(n)
    log_b = torch.full((n + 1,), -math.log(big_n), dtype=dtype)
    log_b[n] += math.log(m)
    reg = 1.0 / math.exp(math.log(10.0))
    big_m = aug / reg  # step 6
    u = torch.zeros(batch, m + 1, dtype=dtype)
    v = torch.zeros(batch, n + 1, dtype=dtype)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(big_m + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(big_m + u[:, :, None], dim=1)
    plan = torch.exp(big_m + u[:, :, None] + v[:, None, :] + math.log(big_n))[:, :m, :n]  # 7
    votes = torch.cat([plan.max(dim=2).values, plan.max(dim=1).values], dim=1)  # step 8

    def f(x):  # step 9
        h = F.linear(x[..., None], sd["f.0.weight"], sd["f.0.bias"])
        h = F.gelu(F.layer_norm(h, (16,), sd["f.1.weight"], sd["f.1.bias"], 1e-6))
        return F.linear(h, sd["f.3.weight"], sd["f.3.bias"])[..., 0]

    confidence = torch.sigmoid(f(votes))
    confidence[torch.cat([src_pad, tgt_pad], dim=1)] = 0.0
    return confidence.sum(dim=1)
