"""AMES (Suma, Kordopatis-Zilos, Iscen, Tolias, ECCV 2024): the predecessor of ELViS, a
transformer that scores two images from their local descriptors.

Each image's descriptors are L2-normalised and projected to 128-d (optionally through ITQ sign
bits first, the "dist" variant). A learned match token, the query's and the gallery image's
projections form one sequence that goes through 5 post-norm decoder layers: self-attention
within each image, then cross-attention between the two (the token attends to everything and
everything to it), then a ReLU feed-forward. The token's output, through a linear classifier,
is the raw score, fused with the global similarity like ELViS's (model/fusion.py, with the
authors' lam and temperature per checkpoint).

Only the projection is per image (`embed`); every decoder layer mixes both images, so the rest
is per pair (`score`). Parameter names follow the authors' state dict (mtc_token,
decoder.layers.N.self_attn.in_proj_weight, ...), so their checkpoints load as they are.
tests/reference_ames.py is the plain form this is checked against.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elvis_cli.model.elvis import local_projection
from elvis_cli.model.reranker import Embedded


@dataclass
class AmesConfig:
    """The authors' sizes (conf/model/ames.yaml); heads cannot be read from a state dict."""

    descriptor_dim: int = 768
    model_dim: int = 128
    heads: int = 2
    layers: int = 5
    feedforward_dim: int = 1024
    # the authors' binarized=True: ITQ sign bits (model_dim of them) before the projection
    binarised: bool = False


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters (in_proj, out_proj), over
    the sequence [token, query (m), gallery (n)]: the token attends to every slot and every
    slot to it; otherwise slots attend within their image, or `across` to the other one.

    Each group of rows attends to its own keys only, instead of all of them under a mask: half
    the work of the authors' masked attention, with the same result.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, m: int, keys: torch.Tensor | None, across: bool
                ) -> torch.Tensor:
        """x (B, 1 + m + n, d); keys (B, 1 + m + n): False where a slot is padding (None:
        none is)."""
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        token, query, gallery = slice(0, 1), slice(1, 1 + m), slice(1 + m, length)

        def attend(rows: slice, *parts: slice) -> torch.Tensor:
            mask = None if keys is None else torch.cat([keys[:, p] for p in parts], 1)
            return F.scaled_dot_product_attention(
                q[:, :, rows], torch.cat([k[:, :, p] for p in parts], 2),
                torch.cat([v[:, :, p] for p in parts], 2),
                attn_mask=None if mask is None else mask[:, None, None, :])

        attended = torch.cat([attend(token, token, query, gallery),
                              attend(query, token, gallery if across else query),
                              attend(gallery, token, query if across else gallery)], dim=2)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, dim))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention, cross-attention, feed-forward, each added and normalised."""

    def __init__(self, dim: int, heads: int, feedforward_dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.linear1 = nn.Linear(dim, feedforward_dim)
        self.linear2 = nn.Linear(feedforward_dim, dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))

    def forward(self, x: torch.Tensor, m: int, keys: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, m, keys, across=False))
        x = self.norm2(x + self.cross_attn(x, m, keys, across=True))
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


class Ames(nn.Module):
    def __init__(self, config: AmesConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AmesConfig()
        dim = config.model_dim
        self.remap_local = local_projection(config.descriptor_dim, dim, config.binarised)
        self.mtc_token = nn.Parameter(torch.zeros(dim))
        self.decoder = nn.ModuleDict({"layers": nn.ModuleList(
            DecoderLayer(dim, config.heads, config.feedforward_dim)
            for _ in range(config.layers))})
        self.classifier = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.mtc_token, std=0.02)

    def embed(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> Embedded:
        """(B, m, D) descriptors projected to (B, m, model_dim); no per-descriptor gains
        (zeros, for the engine's layout). Released binarised files hold the ITQ bits already,
        which must not be normalised: ItqBinarisation normalises float input itself."""
        if not self.config.binarised:
            descriptors = F.normalize(descriptors, dim=-1)
        projected = self.remap_local(descriptors)
        return Embedded(projected, projected.new_zeros(projected.shape[:2]), mask)

    def score(self, src: Embedded, tgt: Embedded) -> torch.Tensor:
        """(B,) raw scores; a (1, m, d) query broadcasts over B gallery images.

        At inference the gallery's float projections are rounded to float16, as the authors'
        model does (they store them so), so that scores match theirs.
        """
        batch, n, dim = tgt.descriptors.shape
        m = src.descriptors.shape[1]
        query = src.descriptors.float().expand(batch, -1, -1)
        gallery = tgt.descriptors.float()
        if not self.training and not self.config.binarised:
            gallery = gallery.half().float()
        token = self.mtc_token.expand(batch, 1, dim)
        x = torch.cat([token, query, gallery], dim=1)
        keys = _real_slots(src.mask, tgt.mask, batch, m, n, x.device)
        for layer in self.decoder["layers"]:
            x = layer(x, m, keys)
        return self.classifier(x[:, 0]).squeeze(-1)

    def logit(self, raw_score: torch.Tensor) -> torch.Tensor:
        """Training-time logit for the binary cross-entropy loss: the raw score itself, the
        classifier's output (the authors train BCE-with-logits on it)."""
        return raw_score

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw AMES scores (B,) of B pairs of descriptor sets (B, m, D) and (B, n, D)."""
        return self.score(self.embed(src, src_mask), self.embed(tgt, tgt_mask))


def _real_slots(src_mask: torch.Tensor | None, tgt_mask: torch.Tensor | None, batch: int,
                m: int, n: int, device: torch.device) -> torch.Tensor | None:
    """(B, 1 + m + n) True where a slot of [token, query, gallery] is not padding; None when
    none is. The token never is, so no row is left without a key."""
    if src_mask is None and tgt_mask is None:
        return None
    padding = [torch.zeros(batch, 1, dtype=torch.bool, device=device),
               _padding(src_mask, batch, m, device), _padding(tgt_mask, batch, n, device)]
    return ~torch.cat(padding, dim=1)


def _padding(mask: torch.Tensor | None, batch: int, count: int, device: torch.device
             ) -> torch.Tensor:
    if mask is None:
        return torch.zeros(batch, count, dtype=torch.bool, device=device)
    return mask.to(device).expand(batch, -1)
