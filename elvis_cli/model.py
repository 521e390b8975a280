"""ELViS: an image-pair similarity from local-descriptor correspondences (ELVIS_SPEC §1).

Descriptors are projected to 128-d, each gets a learned dustbin gain, an entropic optimal
transport plan is computed with 10 Sinkhorn iterations, and the best transport value of every
descriptor is a "vote" that a small learned function turns into a count of confident matches.

Parameter names follow the official state dict, so the released checkpoints load as they are.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# In the linear domain the kernel is exp(A / reg - 1 / reg). Similarities and tanh gains lie in
# [-1, 1], so those entries sit in [exp(-2 / reg), 1]; only the learned dust_bin corner can leave
# float32's comfortable range. Past this exponent we fall back to the log domain.
_LINEAR_DOMAIN_MAX_EXPONENT = 60.0


@dataclass
class ElvisConfig:
    descriptor_dim: int = 768
    model_dim: int = 128
    sinkhorn_iterations: int = 10
    temperature: float = math.log(10.0)  # fixed, not learned: reg = exp(-temperature) = 0.1

    @property
    def regularisation(self) -> float:
        return math.exp(-self.temperature)


@dataclass
class Embedded:
    """Per-image part of the model, computed once per image and reused for every pair."""

    descriptors: torch.Tensor  # (B, m, model_dim), rows L2-normalised
    gains: torch.Tensor  # (B, m) dustbin gains in [-1, 1]
    mask: torch.Tensor | None = None  # (B, m) True where the slot is padding


class Elvis(nn.Module):
    def __init__(self, config: ElvisConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ElvisConfig()
        dim = config.model_dim
        self.remap_local = nn.Sequential(
            nn.Linear(config.descriptor_dim, dim), nn.LayerNorm(dim, eps=1e-5)
        )
        self.dust_bin_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.f = nn.Sequential(
            nn.Linear(1, 16), nn.LayerNorm(16, eps=1e-6), nn.GELU(), nn.Linear(16, 1)
        )
        self.g = nn.Sequential(nn.Linear(1, 64), nn.GELU(), nn.Linear(64, 1))

    def embed(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> Embedded:
        """Project (B, m, D) descriptors and compute their dustbin gains (steps 1-2)."""
        projected = F.normalize(self.remap_local(descriptors), dim=-1)
        gains = torch.tanh(self.dust_bin_mlp(projected)).squeeze(-1)
        return Embedded(projected, gains, mask)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw ELViS scores (B,) of B pairs of descriptor sets (B, m, D) and (B, n, D)."""
        return self.score(self.embed(src, src_mask), self.embed(tgt, tgt_mask))

    def score(self, src: Embedded, tgt: Embedded) -> torch.Tensor:
        """Raw scores from embedded images; a (1, m, d) query broadcasts over B gallery images."""
        similarity = torch.matmul(src.descriptors, tgt.descriptors.transpose(-1, -2))
        batch = similarity.shape[0]
        src_gains = src.gains.expand(batch, -1)
        src_mask = None if src.mask is None else src.mask.expand(batch, -1)
        row_votes, col_votes = transport_votes(
            similarity,
            src_gains,
            tgt.gains,
            self.dust_bin,
            src_mask,
            tgt.mask,
            self.config.regularisation,
            self.config.sinkhorn_iterations,
        )
        return self.aggregate(row_votes, col_votes, src_mask, tgt.mask)

    def aggregate(
        self,
        row_votes: torch.Tensor,
        col_votes: torch.Tensor,
        src_mask: torch.Tensor | None,
        tgt_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Steps 8-9: each vote through f and a sigmoid, padding zeroed, summed per pair."""
        votes = torch.cat([row_votes, col_votes], dim=1)
        confidences = torch.sigmoid(self.f(votes.unsqueeze(-1)).squeeze(-1))
        valid = torch.cat([_valid(src_mask, row_votes), _valid(tgt_mask, col_votes)], dim=1)
        return (confidences * valid).sum(dim=1)

    def logit(self, raw_score: torch.Tensor) -> torch.Tensor:
        """Training-time logit g(raw) for the binary cross-entropy loss (step 10)."""
        return self.g(raw_score.unsqueeze(-1)).squeeze(-1)


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return ~mask


def transport_votes(
    similarity: torch.Tensor,
    src_gains: torch.Tensor,
    tgt_gains: torch.Tensor,
    dust_bin: torch.Tensor,
    src_mask: torch.Tensor | None,
    tgt_mask: torch.Tensor | None,
    regularisation: float,
    iterations: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-8: row and column maxima of the rescaled transport plan P' (dustbins dropped).

    The linear-domain form needs one exponential per entry instead of one per entry and
    iteration; it is exact up to rounding while the dustbin corner stays in range, and the
    log-domain form of the spec takes over when it does not.
    """
    solve = _log_domain_votes if uses_log_domain(dust_bin, regularisation) else _linear_domain_votes
    return solve(
        similarity, src_gains, tgt_gains, dust_bin, src_mask, tgt_mask, regularisation, iterations
    )


def uses_log_domain(dust_bin: torch.Tensor, regularisation: float) -> bool:
    """Whether the dustbin corner is too large for the linear domain's float32 range."""
    return (dust_bin.detach().abs().item() + 1.0) / regularisation > _LINEAR_DOMAIN_MAX_EXPONENT


def _log_marginals(m: int, n: int) -> tuple[float, float, float, float]:
    """Log marginals of step 5: rows, dustbin row, columns, dustbin column (padding counted)."""
    log_norm = -math.log(m + n)
    return log_norm, log_norm + math.log(n), log_norm, log_norm + math.log(m)


def _linear_domain_votes(
    similarity: torch.Tensor,
    src_gains: torch.Tensor,
    tgt_gains: torch.Tensor,
    dust_bin: torch.Tensor,
    src_mask: torch.Tensor | None,
    tgt_mask: torch.Tensor | None,
    regularisation: float,
    iterations: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn with scaling vectors u = exp(log u), v = exp(log v) on K = exp(M - shift).

    A constant shift of every row of M is absorbed exactly by the first u update, so the
    iterates are those of the log-domain algorithm started from u = v = 0.
    """
    batch, m, n = similarity.shape
    shift = 1.0 / regularisation
    scores = similarity
    if src_mask is not None or tgt_mask is not None:
        scores = scores.masked_fill(_pair_mask(src_mask, tgt_mask, similarity), -math.inf)
    kernel = torch.exp(scores * shift - shift)  # (B, m, n)
    row_dust = torch.exp((src_gains - 1.0) * shift)  # (B, m): column n of the kernel
    col_dust = torch.exp((tgt_gains - 1.0) * shift)  # (B, n): row m of the kernel
    corner = torch.exp((dust_bin - 1.0) * shift)
    log_a, log_a_dust, log_b, log_b_dust = _log_marginals(m, n)
    a, a_dust, b, b_dust = (math.exp(x) for x in (log_a, log_a_dust, log_b, log_b_dust))

    v = similarity.new_ones(batch, n)
    v_dust = similarity.new_ones(batch)
    for _ in range(iterations):
        u = a / (torch.bmm(kernel, v.unsqueeze(-1)).squeeze(-1) + row_dust * v_dust[:, None])
        u_dust = a_dust / ((col_dust * v).sum(dim=1) + corner * v_dust)
        v = b / (torch.bmm(u.unsqueeze(1), kernel).squeeze(1) + col_dust * u_dust[:, None])
        v_dust = b_dust / ((row_dust * u).sum(dim=1) + corner * u_dust)

    # The shift is absorbed into u (u here is exp(shift) times the log-domain exp(u)), so
    # P'_ij = exp(M_ij + log u_i + log v_j + log N) = kernel_ij * u_i * v_j * N.
    row_votes = (kernel * v[:, None, :]).amax(dim=2) * u * (m + n)
    col_votes = (kernel * u[:, :, None]).amax(dim=1) * v * (m + n)
    return row_votes, col_votes


def _log_domain_votes(
    similarity: torch.Tensor,
    src_gains: torch.Tensor,
    tgt_gains: torch.Tensor,
    dust_bin: torch.Tensor,
    src_mask: torch.Tensor | None,
    tgt_mask: torch.Tensor | None,
    regularisation: float,
    iterations: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's log-domain iterations on the augmented (m+1) x (n+1) matrix."""
    batch, m, n = similarity.shape
    scores = similarity
    if src_mask is not None or tgt_mask is not None:
        scores = scores.masked_fill(_pair_mask(src_mask, tgt_mask, similarity), -math.inf)
    augmented = torch.cat([scores, src_gains.unsqueeze(-1)], dim=2)
    bottom = torch.cat([tgt_gains, dust_bin.expand(batch).to(tgt_gains)[:, None]], dim=1)
    augmented = torch.cat([augmented, bottom.unsqueeze(1)], dim=1) / regularisation

    log_a_real, log_a_dust, log_b_real, log_b_dust = _log_marginals(m, n)
    log_a = similarity.new_full((batch, m + 1), log_a_real)
    log_a[:, m] = log_a_dust
    log_b = similarity.new_full((batch, n + 1), log_b_real)
    log_b[:, n] = log_b_dust
    u = similarity.new_zeros(batch, m + 1)
    v = similarity.new_zeros(batch, n + 1)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(augmented + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(augmented + u[:, :, None], dim=1)
    plan = torch.exp(augmented + u[:, :, None] + v[:, None, :] + math.log(m + n))[:, :m, :n]
    return plan.amax(dim=2), plan.amax(dim=1)


def _pair_mask(
    src_mask: torch.Tensor | None, tgt_mask: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """(B, m, n) True where either the row or the column is padding."""
    batch, m, n = like.shape
    rows = like.new_zeros(batch, m, dtype=torch.bool) if src_mask is None else src_mask
    cols = like.new_zeros(batch, n, dtype=torch.bool) if tgt_mask is None else tgt_mask
    return rows[:, :, None] | cols[:, None, :]
