"""A slow, plain AMES forward pass written from the architecture (the authors' matcher and
post-norm decoder layers), one pair at a time.

Padding is handled by leaving padded descriptors out altogether (no masks): the model's keys
never attend to them, and the score is read from the match token alone, so the result must be
the same. Attention is written head by head with an explicit softmax; nothing is batched.
"""

import math

import torch
import torch.nn.functional as F


def reference_ames_score(state: dict[str, torch.Tensor], src: torch.Tensor, tgt: torch.Tensor,
                         src_pad: torch.Tensor | None = None, tgt_pad: torch.Tensor | None = None,
                         heads: int = 2, dtype: torch.dtype = torch.float64) -> float:
    """Raw AMES score of one pair: src (m, D), tgt (n, D), padding flags (m,), (n,); the
    authors' inference, gallery projections rounded to float16 (not for binarised input)."""
    sd = {key: value.to(dtype) for key, value in state.items()}
    if src_pad is not None:
        src = src[~src_pad]
    if tgt_pad is not None:
        tgt = tgt[~tgt_pad]
    binarised = "remap_local.0.W" in sd
    s, t = project(sd, src.to(dtype), binarised), project(sd, tgt.to(dtype), binarised)
    if not binarised:
        t = t.float().half().to(dtype)
    m, n = len(s), len(t)
    x = torch.cat([sd["mtc_token"][None], s, t])
    side = [0] + [1] * m + [2] * n
    layers = sorted({int(key.split(".")[2]) for key in sd if key.startswith("decoder.layers.")})
    for index in layers:
        p = f"decoder.layers.{index}."
        x = layer_norm(sd, p + "norm1", x + attention(
            sd, p + "self_attn", x, heads,
            lambda i, j: side[i] == 0 or side[j] == 0 or side[i] == side[j]))
        x = layer_norm(sd, p + "norm2", x + attention(
            sd, p + "cross_attn", x, heads,
            lambda i, j: side[i] == 0 or side[j] == 0 or side[i] != side[j]))
        hidden = torch.relu(x @ sd[p + "linear1.weight"].T + sd[p + "linear1.bias"])
        x = layer_norm(sd, p + "norm3", x + hidden @ sd[p + "linear2.weight"].T
                       + sd[p + "linear2.bias"])
    return float(x[0] @ sd["classifier.weight"][0] + sd["classifier.bias"][0])


def project(sd: dict[str, torch.Tensor], x: torch.Tensor, binarised: bool) -> torch.Tensor:
    """Linear + LayerNorm of the L2-normalised descriptors; binarised: ITQ sign bits first
    (unless x already holds them), then Linear(128, 128) + LayerNorm."""
    if binarised:
        itq = sd["remap_local.0.W"]
        if x.shape[-1] != itq.shape[1]:
            x = torch.sign((x / x.norm(dim=-1, keepdim=True)) @ itq)
        return layer_norm(sd, "remap_local.2", x @ sd["remap_local.1.weight"].T
                          + sd["remap_local.1.bias"])
    x = x / x.norm(dim=-1, keepdim=True)
    return layer_norm(sd, "remap_local.1", x @ sd["remap_local.0.weight"].T
                      + sd["remap_local.0.bias"])


def attention(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, heads: int,
              allowed) -> torch.Tensor:
    """nn.MultiheadAttention(x, x, x) with row i seeing column j only where allowed(i, j)."""
    length, dim = x.shape
    q, k, v = (x @ sd[prefix + ".in_proj_weight"].T + sd[prefix + ".in_proj_bias"]).split(dim, 1)
    width = dim // heads
    blocked = torch.tensor([[not allowed(i, j) for j in range(length)] for i in range(length)])
    outputs = []
    for h in range(heads):
        part = slice(h * width, (h + 1) * width)
        logits = q[:, part] @ k[:, part].T / math.sqrt(width)
        logits = logits.masked_fill(blocked, -math.inf)
        weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        outputs.append((weights / weights.sum(dim=1, keepdim=True)) @ v[:, part])
    return torch.cat(outputs, dim=1) @ sd[prefix + ".out_proj.weight"].T \
        + sd[prefix + ".out_proj.bias"]


def layer_norm(sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)
