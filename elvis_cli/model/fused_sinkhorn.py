"""Sinkhorn iterations and votes of one pair on the CPU, compiled into one loop (numba).

Why: once the similarity GEMM is done, ELViS spends its time in 10 Sinkhorn iterations and the
votes, all passes over a (m+1) x (n+1) kernel that sits in the core's L2 cache. As torch ops
that is 20 matrix-vector products and four elementwise passes, each a separate call that
reads the whole kernel. Here an iteration reads it once, four rows at a time: their dot
products with v give four entries of u, and the same rows, still in L1, are added into K^T u.
The votes (row and column maxima of the rescaled plan) take one more pass.

The kernel arrives in pieces, so that its body is a plain GEMM output with no border:
body K_ij = exp(S_ij / reg) (m, n) between the real (unpadded) descriptors; dustbin_row
exp(ht_j / reg) (n,), their gallery gains; dustbin_col exp(hs_i / reg) (m,), their query gains;
corner exp(dust_bin / reg). A padded slot's kernel row (or column) is 0 but for its dustbin
entry, so its only terms are that entry: padded_col_bins (p,) holds the query's padded slots'
dustbin entries and padded_row_bins (q,) the gallery's, and their updates take O(p + q), not
a pass over zeros (files keep up to K descriptors per image and many images have fewer: half
of the body's work was padding on the demo). They still count in the marginals, as in the
authors' model. Unlike torch's linear-domain path, the kernel is not shifted by -1/reg: a
constant factor on every entry is absorbed exactly by the first u update, and the range stays
within float32's for the dust_bin values that the linear domain accepts at all.
"""

import numpy as np
from numba import njit


@njit(nogil=True, fastmath=True, cache=True, boundscheck=False)
def sinkhorn_votes(
    body: np.ndarray,
    dustbin_row: np.ndarray,
    dustbin_col: np.ndarray,
    padded_row_bins: np.ndarray,
    padded_col_bins: np.ndarray,
    corner: float,
    iterations: int,
    row_votes: np.ndarray,
    col_votes: np.ndarray,
) -> None:
    """Fill row_votes (m,) and col_votes (n,) with the maxima of P' = N * diag(u) K diag(v)
    over the real descriptors (a padded slot's vote would be 0).

    Marginals (step 5): 1/N for every slot, padded ones included, (n + q)/N and (m + p)/N for
    the two dustbins, N = m + p + n + q.
    """
    m, n = body.shape
    query_slots = m + len(padded_col_bins)
    gallery_slots = n + len(padded_row_bins)
    total = np.float32(query_slots + gallery_slots)
    share = np.float32(1.0) / total
    row_bin_share = np.float32(gallery_slots) / total
    col_bin_share = np.float32(query_slots) / total
    u = np.zeros(m, np.float32)  # (zero iterations: no votes)
    v = np.ones(n, np.float32)
    v_padded = np.ones(len(padded_row_bins), np.float32)
    v_bin = np.float32(1.0)
    column_sums = np.empty(n, np.float32)  # K^T u, built row by row
    blocked = m - m % 4
    for _ in range(iterations):
        column_sums[:] = 0.0
        bin_sum = np.float32(0.0)
        for i in range(0, blocked, 4):
            r0, r1, r2, r3 = body[i], body[i + 1], body[i + 2], body[i + 3]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for j in range(n):
                vj = v[j]
                s0 += r0[j] * vj
                s1 += r1[j] * vj
                s2 += r2[j] * vj
                s3 += r3[j] * vj
            u0 = share / (s0 + dustbin_col[i] * v_bin)
            u1 = share / (s1 + dustbin_col[i + 1] * v_bin)
            u2 = share / (s2 + dustbin_col[i + 2] * v_bin)
            u3 = share / (s3 + dustbin_col[i + 3] * v_bin)
            u[i], u[i + 1], u[i + 2], u[i + 3] = u0, u1, u2, u3
            for j in range(n):
                column_sums[j] += u0 * r0[j] + u1 * r1[j] + u2 * r2[j] + u3 * r3[j]
            bin_sum += (u0 * dustbin_col[i] + u1 * dustbin_col[i + 1]
                        + u2 * dustbin_col[i + 2] + u3 * dustbin_col[i + 3])
        for i in range(blocked, m):
            row = body[i]
            s = np.float32(0.0)
            for j in range(n):
                s += row[j] * v[j]
            ui = share / (s + dustbin_col[i] * v_bin)
            u[i] = ui
            for j in range(n):
                column_sums[j] += ui * row[j]
            bin_sum += ui * dustbin_col[i]
        for bin_entry in padded_col_bins:  # a padded query slot: its dustbin entry only
            bin_sum += share / (bin_entry * v_bin) * bin_entry
        s = np.float32(0.0)  # the dustbin row
        for j in range(n):
            s += dustbin_row[j] * v[j]
        for k in range(len(padded_row_bins)):
            s += padded_row_bins[k] * v_padded[k]
        u_bin = row_bin_share / (s + corner * v_bin)
        for j in range(n):
            v[j] = share / (column_sums[j] + u_bin * dustbin_row[j])
        for k in range(len(padded_row_bins)):  # a padded gallery slot: its dustbin entry only
            v_padded[k] = share / (u_bin * padded_row_bins[k])
        v_bin = col_bin_share / (bin_sum + u_bin * corner)
    # Votes. Every entry of the plan is >= 0, and non-negative floats order like their bit
    # patterns read as int32: an int32 maximum vectorizes, a float one does not (9x slower).
    col_votes[:] = 0.0
    scaled = np.empty(n, np.float32)
    scaled_bits = scaled.view(np.int32)
    best = np.zeros(1, np.int32)
    best_value = best.view(np.float32)
    for i in range(m):
        row = body[i]
        ui = u[i] * total
        for j in range(n):
            scaled[j] = row[j] * v[j]
            col_votes[j] = max(col_votes[j], scaled[j] * ui)
        best[0] = 0
        for j in range(n):
            best[0] = max(best[0], scaled_bits[j])
        row_votes[i] = best_value[0] * ui
