"""ELViS: an image-pair similarity from local-descriptor correspondences (ELVIS_SPEC §1).

Descriptors are projected to 128-d, each gets a learned dustbin gain, an entropic optimal
transport plan is computed with 10 Sinkhorn iterations, and the best transport value of every
descriptor is a "vote" that a small learned function turns into a count of confident matches.

Parameter names follow the official state dict, so the released checkpoints load as they are.
For speed, Sinkhorn runs in the linear domain, with the spec's log domain as fallback. CPU
inference runs it pair by pair in a compiled loop (fused_sinkhorn), and f on the votes in
another (vote_confidence); CUDA and training use
torch ops, where each image becomes rows whose products give the whole augmented matrix in one
GEMM (Elvis.rows, transport_votes). tests/reference_elvis.py is the plain form both are
checked against.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elvis_cli.model.fused_sinkhorn import sinkhorn_votes
from elvis_cli.model.reranker import Embedded
from elvis_cli.model.vote_confidence import confidence_sum, vote_function_parameters

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
    # the authors' Matcher(binarized=True): descriptors are ITQ sign bits (model_dim of them)
    # before the projection, and the projection is Linear(model_dim, model_dim)
    binarised: bool = False

    @property
    def regularisation(self) -> float:
        return math.exp(-self.temperature)


@dataclass
class Transport:
    """A batch of optimal-transport problems, given by the per-image rows of Elvis.rows."""

    src_rows: torch.Tensor  # (B or 1, m + 1, k) query rows; a single query broadcasts;
    # float16 rows (CUDA only) take the tensor-core product, within 1e-3 of float32 scores
    tgt_rows: torch.Tensor  # (B, n + 1, k) gallery rows
    src_mask: torch.Tensor | None  # (B or 1, m) True where padding
    tgt_mask: torch.Tensor | None  # (B, n)
    regularisation: float
    iterations: int

    @property
    def sizes(self) -> tuple[int, int]:
        return self.src_rows.shape[1] - 1, self.tgt_rows.shape[1] - 1

    def augmented(self, scale: float, offset: float) -> torch.Tensor:
        """scale * A + offset for the augmented matrix A (B, m+1, n+1); padded entries -inf."""
        batch = max(self.src_rows.shape[0], self.tgt_rows.shape[0])
        src, tgt = self.src_rows.expand(batch, -1, -1), self.tgt_rows.transpose(1, 2)
        if src.dtype == torch.float16:  # CUDA tensor cores, accumulated and returned in float32
            scores = torch.bmm(src, tgt, out_dtype=torch.float32).mul_(scale).add_(offset)
        else:
            scores = torch.baddbmm(src.new_full((1, 1, 1), offset), src, tgt, alpha=scale)
        if self.src_mask is not None or self.tgt_mask is not None:
            m, n = self.sizes
            body = scores[:, :m, :n]
            body.masked_fill_(_pair_mask(self.src_mask, self.tgt_mask, body), -math.inf)
        return scores

    def log_marginals(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 5: log a (m + 1,) and log b (n + 1,), padding counted in N = m + n."""
        m, n = self.sizes
        log_a = like.new_full((m + 1,), -math.log(m + n))
        log_b = like.new_full((n + 1,), -math.log(m + n))
        log_a[m] += math.log(n)
        log_b[n] += math.log(m)
        return log_a, log_b


@dataclass
class PairTransport:
    """Everything one pair's raw score is made of (steps 3-9), as plain tensors: what
    `elvis explain` shows, kept apart from scoring, which needs only the votes."""

    similarity: torch.Tensor  # (m, n) S; -inf where either descriptor is padding
    plan: torch.Tensor  # (m, n) P', dustbins dropped
    votes: torch.Tensor  # (m + n,) row maxima of P' (query descriptors), then column maxima
    confidences: torch.Tensor  # (m + n,) sigmoid(f(vote)), 0 for padding: their sum is the
    # raw score


class ItqBinarisation(nn.Module):
    """ITQ sign bits of L2-normalised descriptors (the authors' BinarizationLayer in eval mode).

    Released binarised files already hold these bits (as -1/+1), so input as wide as the bits
    (and narrower than the descriptors) passes through: it is this layer's output.
    """

    def __init__(self, descriptor_dim: int, bits: int) -> None:
        super().__init__()
        # fixed projection (itq_<desc>_D128.pt); the sign has no useful gradient
        self.W = nn.Parameter(torch.zeros(descriptor_dim, bits), requires_grad=False)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        dims, bits = self.W.shape
        if descriptors.shape[-1] == bits != dims:
            return descriptors
        return torch.sign(F.normalize(descriptors, dim=-1) @ self.W.to(descriptors.dtype))


def local_projection(descriptor_dim: int, model_dim: int, binarised: bool) -> nn.Sequential:
    """The authors' Matcher.remap_local, shared by ELViS and AMES: Linear and LayerNorm, or
    (binarised) ITQ sign bits, Linear(model_dim, model_dim) and LayerNorm."""
    projection = ([ItqBinarisation(descriptor_dim, model_dim), nn.Linear(model_dim, model_dim)]
                  if binarised else [nn.Linear(descriptor_dim, model_dim)])
    return nn.Sequential(*projection, nn.LayerNorm(model_dim, eps=1e-5))


class Elvis(nn.Module):
    def __init__(self, config: ElvisConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ElvisConfig()
        dim = config.model_dim
        self.remap_local = local_projection(config.descriptor_dim, dim, config.binarised)
        self.dust_bin_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.f = nn.Sequential(
            nn.Linear(1, 16), nn.LayerNorm(16, eps=1e-6), nn.GELU(), nn.Linear(16, 1)
        )
        self.g = nn.Sequential(nn.Linear(1, 64), nn.GELU(), nn.Linear(64, 1))

    def embed(self, descriptors: torch.Tensor, mask: torch.Tensor | None = None) -> Embedded:
        """Project (B, m, D) descriptors and compute their dustbin gains (steps 1-2).

        CPU inference embeds image by image, so that an image's embedding is the same bits
        whatever batch it arrives in: a GEMM of another height, or a vectorised kernel whose
        tail (computed by scalar code) falls elsewhere, rounds differently.
        """
        if _infers_on_cpu(descriptors, self.dust_bin) and descriptors.shape[0] > 1:
            parts = [self._embed_batch(image[None]) for image in descriptors]
            return Embedded(torch.cat([part[0] for part in parts]),
                            torch.cat([part[1] for part in parts]), mask)
        return Embedded(*self._embed_batch(descriptors), mask)

    def _embed_batch(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected = F.normalize(self.remap_local(descriptors), dim=-1)
        return projected, torch.tanh(self.dust_bin_mlp(projected)).squeeze(-1)

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
        """Raw scores from embedded images; a (1, m, d) query broadcasts over B gallery images.

        CPU inference takes the compiled loop (fused_sinkhorn), one pair at a time; CUDA,
        training (autograd) and large dust_bin values take the torch transport below.
        """
        regularisation = self.config.regularisation
        log_domain = uses_log_domain(self.dust_bin, regularisation)
        if not log_domain and _runs_compiled(src, tgt):
            return self._compiled_scores(src, tgt)
        problem = Transport(self.rows(src, query=True), self.rows(tgt, query=False),
                            src.mask, tgt.mask, regularisation, self.config.sinkhorn_iterations)
        return self.score_transport(problem, log_domain)

    def score_transport(self, problem: Transport, log_domain: bool) -> torch.Tensor:
        """Steps 6-9 on prepared rows; `log_domain` is decided once by the caller (no sync)."""
        row_votes, col_votes = transport_votes(problem, log_domain)
        if problem.src_mask is not None:  # a single query's mask broadcasts like its rows
            src_mask = problem.src_mask.expand(row_votes.shape[0], -1)
        else:
            src_mask = None
        return self.aggregate(row_votes, col_votes, src_mask, problem.tgt_mask)

    def _compiled_scores(self, src: Embedded, tgt: Embedded) -> torch.Tensor:
        """Steps 3-9 pair by pair, so that each pair's kernel stays in the core's cache.

        Every pair goes through the same operations on tensors of the same shapes, whichever
        pairs share the call, so its score is the same bits for any chunking of the work.
        The similarity body is one GEMM between the pair's real descriptors, with the 1/reg
        scale folded in; padded slots enter only through their dustbin entries (their votes
        would be 0), and the dustbin border comes from the per-image gains, so no augmented
        rows are built. The kernel's exponential is numpy's and f is compiled too
        (vote_confidence): benchmarks/rerank_parts.py times both against torch's.
        """
        scale = 1.0 / self.config.regularisation
        corner = np.float32(math.exp(self.dust_bin.item() * scale))
        (query_rows, query_gains, query_real), (rows, gains, real) = map(_real_first, (src, tgt))
        # exp(gain / reg) image by image, so that no image's bits depend on the others
        query_bins = [np.exp(values * np.float32(scale)) for values in query_gains.numpy()]
        scores = np.empty(len(real), np.float32)
        buffer = torch.empty(query_rows.shape[1] * rows.shape[1])
        votes = np.empty(query_rows.shape[1] + rows.shape[1], np.float32)
        vote_function = vote_function_parameters(self.f)
        for pair, count in enumerate(real):
            query = min(pair, len(query_real) - 1)  # a single query serves every pair
            query_count = query_real[query]
            bins = np.exp(gains[pair].numpy() * np.float32(scale))
            body = buffer[: query_count * count].view(query_count, count)
            torch.addmm(body, query_rows[query, :query_count], rows[pair, :count].T, beta=0,
                        alpha=scale, out=body)
            kernel = body.numpy()
            np.exp(kernel, out=kernel)
            row_votes, column_votes = votes[:query_count], votes[query_count : query_count + count]
            sinkhorn_votes(kernel, bins[:count], query_bins[query][:query_count], bins[count:],
                           query_bins[query][query_count:], corner,
                           self.config.sinkhorn_iterations, row_votes, column_votes)
            # step 9 on real votes only (a padded slot's vote would be zeroed)
            scores[pair] = confidence_sum(votes[: query_count + count], *vote_function)
        return torch.from_numpy(scores)

    def transport(self, src: Embedded, tgt: Embedded) -> PairTransport:
        """Steps 3-9 of one pair, embedded as (1, m, d) and (1, n, d), by the torch transport
        (the path of CUDA and training), with S, P' and every vote kept."""
        regularisation = self.config.regularisation
        problem = Transport(self.rows(src, query=True), self.rows(tgt, query=False),
                            src.mask, tgt.mask, regularisation, self.config.sinkhorn_iterations)
        plan = transport_plan(problem, uses_log_domain(self.dust_bin, regularisation))
        similarity = src.descriptors[0].float() @ tgt.descriptors[0].float().T
        if src.mask is not None or tgt.mask is not None:
            similarity.masked_fill_(_pair_mask(src.mask, tgt.mask, similarity[None])[0],
                                    -math.inf)
        votes, contributions = self.vote_contributions(plan.amax(dim=2), plan.amax(dim=1),
                                                       src.mask, tgt.mask)
        return PairTransport(similarity, plan[0], votes[0], contributions[0])

    def rows(self, embedded: Embedded, query: bool) -> torch.Tensor:
        """Per-image rows (B, m + 1, d + 2) whose products are the augmented matrix of step 4.

        Query rows are [s_i, 0, hs_i] plus [0, 1, 0]; gallery rows are [t_j, ht_j, 0] plus
        [0, dust_bin, 1]. So one GEMM yields S, both dustbin gains and the corner exactly (the
        extra terms are products with zero), and all of it is per-image work done once.
        """
        descriptors = embedded.descriptors
        batch, count, dim = descriptors.shape
        rows = descriptors.new_zeros(batch, count + 1, dim + 2)
        rows[:, :count, :dim] = descriptors
        if query:
            rows[:, :count, dim + 1] = embedded.gains
            rows[:, count, dim] = 1.0
        else:
            rows[:, :count, dim] = embedded.gains
            rows[:, count, dim] = self.dust_bin
            rows[:, count, dim + 1] = 1.0
        return rows

    def aggregate(
        self,
        row_votes: torch.Tensor,
        col_votes: torch.Tensor,
        src_mask: torch.Tensor | None,
        tgt_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Steps 8-9: each vote through f and a sigmoid, padding zeroed, summed per pair."""
        return self.vote_contributions(row_votes, col_votes, src_mask, tgt_mask)[1].sum(dim=1)

    def vote_contributions(
        self,
        row_votes: torch.Tensor,
        col_votes: torch.Tensor,
        src_mask: torch.Tensor | None,
        tgt_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 8 per vote: (B, m + n) votes, and each one's sigmoid(f(vote)), padding zeroed;
        their sum is the raw score (`aggregate`), the parts are what `explain` shows."""
        votes = torch.cat([row_votes, col_votes], dim=1)
        confidences = torch.sigmoid(self.f(votes.unsqueeze(-1)).squeeze(-1))
        valid = torch.cat([_valid(src_mask, row_votes), _valid(tgt_mask, col_votes)], dim=1)
        return votes, confidences * valid

    def logit(self, raw_score: torch.Tensor) -> torch.Tensor:
        """Training-time logit g(raw) for the binary cross-entropy loss (step 10)."""
        return self.g(raw_score.unsqueeze(-1)).squeeze(-1)


def _infers_on_cpu(*tensors: torch.Tensor) -> bool:
    """CPU float32 inference: no autograd graph is being built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _runs_compiled(src: Embedded, tgt: Embedded) -> bool:
    """What fused_sinkhorn serves: CPU float32 inference (it has no autograd and no CUDA)."""
    return _infers_on_cpu(src.descriptors, src.gains, tgt.descriptors, tgt.gains)


def _real_first(embedded: Embedded) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Descriptors (B, K, d) and gains (B, K) with each image's real slots first, in their
    order, and each image's count of real slots. Files store padding last, so this is one
    check per call and no copy."""
    descriptors, gains, mask = embedded.descriptors, embedded.gains, embedded.mask
    if mask is None:
        return descriptors, gains, [descriptors.shape[1]] * descriptors.shape[0]
    counts = (~mask).sum(dim=1)
    if not bool((mask == (torch.arange(mask.shape[1]) >= counts[:, None])).all()):
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
        descriptors = descriptors.gather(1, order[..., None].expand_as(descriptors))
        gains = gains.gather(1, order)
    return descriptors, gains, counts.tolist()


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return ~mask


def transport_votes(problem: Transport, log_domain: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 6-8: row and column maxima of the rescaled transport plan P' (dustbins dropped).

    The linear-domain form needs one exponential per entry instead of one per entry and
    iteration; it is exact up to rounding while the dustbin corner stays in range (see
    uses_log_domain), and the log-domain form of the spec takes over when it does not.
    """
    solve = _log_domain_votes if log_domain else _linear_domain_votes
    return solve(problem)


def uses_log_domain(dust_bin: torch.Tensor, regularisation: float) -> bool:
    """Whether the dustbin corner is too large for the linear domain's float32 range."""
    return (dust_bin.detach().abs().item() + 1.0) / regularisation > _LINEAR_DOMAIN_MAX_EXPONENT


def transport_plan(problem: Transport, log_domain: bool) -> torch.Tensor:
    """Steps 6-7 alone: the rescaled transport plan P' (B, m, n), whose row and column maxima
    are exactly the votes of transport_votes (a positive factor per row keeps the maxima's
    bits). For showing why a pair scored as it did; scoring needs only the maxima."""
    if log_domain:
        return _log_domain_plan(problem)
    plan, u = _linear_domain_plan(problem)
    return _scaled(plan, u[:, :, None])


def _linear_domain_votes(problem: Transport) -> tuple[torch.Tensor, torch.Tensor]:
    plan, u = _linear_domain_plan(problem)
    row_votes = plan.amax(dim=2) * u
    col_votes = _scaled(plan, u[:, :, None]).amax(dim=1)
    return row_votes, col_votes


def _linear_domain_plan(problem: Transport) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn with scaling vectors u = exp(log u), v = exp(log v) on K = exp(M - shift):
    P' with its columns scaled (B, m, n) and the row factors u (B, m), N included.

    A constant shift of every row of M is absorbed exactly by the first u update, so the
    iterates are those of the log-domain algorithm started from u = v = 0. Each iteration is
    two matrix-vector products over K, which stays in cache for small batches.
    """
    m, n = problem.sizes
    shift = 1.0 / problem.regularisation
    kernel = problem.augmented(shift, -shift).exp_()  # (B, m + 1, n + 1)
    a, b = (x.exp()[:, None] for x in problem.log_marginals(kernel))
    transposed = kernel.transpose(1, 2)
    v = kernel.new_ones(kernel.shape[0], n + 1, 1)
    for _ in range(problem.iterations):
        u = a / torch.bmm(kernel, v)  # (B, m + 1, 1)
        v = b / torch.bmm(transposed, u)  # (B, n + 1, 1)
    # u here is exp(shift) times the log-domain exp(u), so
    # P'_ij = exp(M_ij + log u_i + log v_j + log N) = kernel_ij * u_i * v_j * N.
    u, v = u[:, :m, 0] * (m + n), v[:, :n, 0]
    return _scaled(kernel[:, :m, :n], v[:, None, :]), u


def _scaled(matrix: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """matrix * factor, in place when no autograd graph needs it: saves a pass of allocation."""
    if torch.is_grad_enabled() and matrix.requires_grad:
        return matrix * factor
    return matrix.mul_(factor)


def _log_domain_votes(problem: Transport) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _log_domain_plan(problem)
    return plan.amax(dim=2), plan.amax(dim=1)


def _log_domain_plan(problem: Transport) -> torch.Tensor:
    """The spec's log-domain iterations on the augmented (m+1) x (n+1) matrix: P' (B, m, n)."""
    m, n = problem.sizes
    augmented = problem.augmented(1.0 / problem.regularisation, 0.0)
    log_a, log_b = problem.log_marginals(augmented)
    v = augmented.new_zeros(augmented.shape[0], n + 1)
    for _ in range(problem.iterations):
        u = log_a - torch.logsumexp(augmented + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(augmented + u[:, :, None], dim=1)
    return torch.exp(augmented + u[:, :, None] + v[:, None, :] + math.log(m + n))[:, :m, :n]


def _pair_mask(
    src_mask: torch.Tensor | None, tgt_mask: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """(B, m, n) True where either the row or the column is padding."""
    batch, m, n = like.shape
    rows = like.new_zeros(batch, m, dtype=torch.bool) if src_mask is None else src_mask
    cols = like.new_zeros(batch, n, dtype=torch.bool) if tgt_mask is None else tgt_mask
    return rows[:, :, None] | cols[:, None, :]
