"""Step 9 of the compiled CPU loop: sigmoid(f(vote)) summed over one pair's votes (numba).

Why: f is a 1 -> 16 -> 1 network (Linear, LayerNorm, GELU, Linear). As torch ops it is six
calls per pair on a few hundred votes; here it is one compiled pass, which takes about 0.6 of
their time (benchmarks/rerank_parts.py), in float64, so its error is far below the float32
rounding of torch's own f.

numba has no vector math library, so GELU's erf (16 per vote) would be a scalar libm call
each. Instead erf is a Chebyshev series, computed from math.erf when this module is imported
and summed for many votes at a time, which compiles to vector code. erf is odd, so
only odd terms T_2k+1(u) = u W_k(2u^2 - 1) occur, and their sum takes half the steps.
"""

import math

import numpy as np
import torch
from numba import njit
from numpy.polynomial import chebyshev
from torch import nn

# Beyond ERF_RANGE, erf is +-1 within 2e-10; inside it, a series of degree 41 is within 4e-10.
ERF_RANGE = 4.5
ERF_DEGREE = 41


def _odd_erf_series() -> np.ndarray:
    """Coefficients a_k of erf(ERF_RANGE u) = u sum_k a_k W_k(2u^2 - 1), |u| <= 1."""
    series = chebyshev.chebinterpolate(np.vectorize(lambda u: math.erf(ERF_RANGE * u)),
                                       ERF_DEGREE)
    return np.ascontiguousarray(series[1::2])


ODD_ERF_SERIES = _odd_erf_series()


def vote_function_parameters(f: nn.Sequential) -> tuple[np.ndarray, np.ndarray]:
    """f's weights as `confidence_sum` takes them, in float64.

    LayerNorm of an affine function of one vote v is again simple: with the first Linear's
    weights w and biases b centred over the hidden units (w', b'), its input centred is
    w' v + b' and its variance A v^2 + 2B v + C (A, B, C the means of w'^2, w'b', b'^2). So
    x = (slope v + intercept) / sqrt(A v^2 + 2B v + C + eps) + shift, with slope and
    intercept w' and b' times the LayerNorm's weights and shift its biases.

    Returns rows slope, intercept, shift and the last Linear's weights (4, hidden), and the
    constants A, 2B, C + eps and the last Linear's bias.
    """
    first, norm, _, last = f
    weights, biases, gamma, shift, out_weights, out_bias = (
        parameter.detach().double().reshape(-1) for parameter in (
            first.weight, first.bias, norm.weight, norm.bias, last.weight, last.bias))
    weights, biases = weights - weights.mean(), biases - biases.mean()
    layers = torch.stack([weights * gamma, biases * gamma, shift, out_weights])
    constants = torch.stack([(weights * weights).mean(), 2 * (weights * biases).mean(),
                             (biases * biases).mean() + norm.eps, out_bias[0]])
    return layers.numpy(), constants.numpy()


@njit(nogil=True, fastmath=True, cache=True, boundscheck=False)
def confidence_sum(votes: np.ndarray, layers: np.ndarray, constants: np.ndarray) -> float:
    """sum over votes of sigmoid(f(vote)), f given by `vote_function_parameters`.

    The series is a compile-time constant, so its loop unrolls and the loop over the votes
    around it compiles to vector code."""
    quadratic, linear, constant, output_bias = constants
    count = len(votes)
    vote = np.empty(count)
    scale = np.empty(count)  # LayerNorm's 1 / sqrt(variance + eps)
    f = np.empty(count)
    for i in range(count):
        v = np.float64(votes[i])
        vote[i] = v
        scale[i] = 1.0 / math.sqrt((quadratic * v + linear) * v + constant)
        f[i] = output_bias
    to_u = 1.0 / (math.sqrt(2.0) * ERF_RANGE)
    for k in range(layers.shape[1]):
        slope, intercept, shift, weight = layers[0, k], layers[1, k], layers[2, k], layers[3, k]
        for i in range(count):
            x = (slope * vote[i] + intercept) * scale[i] + shift  # GELU's input
            u = min(max(x * to_u, -1.0), 1.0)  # erf(x / sqrt(2)) = erf(ERF_RANGE u)
            w = 2.0 * u * u - 1.0
            b1 = 0.0
            b2 = 0.0
            for j in range(len(ODD_ERF_SERIES) - 1, 0, -1):  # Clenshaw: W_j+1 = 2w W_j - W_j-1
                b0 = ODD_ERF_SERIES[j] + 2.0 * w * b1 - b2
                b2 = b1
                b1 = b0
            erf = u * (ODD_ERF_SERIES[0] + b1 * (2.0 * w - 1.0) - b2)
            f[i] += weight * 0.5 * x * (1.0 + erf)
    total = 0.0
    for i in range(count):
        total += 1.0 / (1.0 + math.exp(-f[i]))
    return total
