"""GSS, guided similarity separation (Liu et al., NeurIPS 2019): a graph convolutional network
over the k-NN graph of the global descriptors, trained per gallery without labels to push each
pair's similarity away from a threshold β (the loss -½ mean((relu(s) - β)²)), so that
neighbours of neighbours gather and unrelated images part. Its output descriptors re-rank.

The network follows the paper's code (layer6ai-labs/GSS): residual layers
elu(Â x W + b) whose weights start as the identity, Â = D^-½ (A + I) D^-½ with A the
similarity-weighted k-NN graph (symmetric for the gallery; queries only look at the gallery),
full-batch Adam on the gallery graph, then one pass over queries and gallery together.
GSS_V is the same network on a graph whose edges an `EdgeFilter` has verified
(gss_verification.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from elvis_cli.retrieval.config import PostConfig
from elvis_cli.util.errors import InputError
from elvis_cli.util.progress import ProgressCallback, track

# GSS holds gallery x gallery matrices (graph, similarities and their gradients) in memory:
# 20,000 images take a few GB of them
MAX_GSS_IMAGES = 20_000

# which proposed k-NN edges stay: given each row's top-k gallery columns (N, k), their global
# similarities (N, k) and whether the rows are queries, True where the edge is kept (GSS_V)
EdgeFilter = Callable[[np.ndarray, np.ndarray, bool], np.ndarray]


@dataclass
class GssResult:
    """Descriptors after GSS, and how its training went."""

    queries: np.ndarray  # (Q, D) float32, L2-normalised
    gallery: np.ndarray  # (G, D) float32, L2-normalised
    beta: float  # the separation threshold used
    losses: list[float] = field(default_factory=list)  # training loss of each epoch
    seconds: float = 0.0  # training and the final pass


def knn_adjacency(similarity: np.ndarray, k: int, symmetric: bool,
                  verify: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
                  ) -> np.ndarray:
    """Each row's top-`k` columns weighted by their similarity, the rest 0. `symmetric` (a
    gallery with itself) also adds each edge the other way and drops self-edges. `verify`,
    given the top columns (N, k) and their similarities, says which of those edges stay."""
    k = min(k, similarity.shape[1])
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(similarity.shape[0]), k)
    columns = top.ravel()
    values = similarity[rows, columns]
    if verify is not None:
        kept = verify(top, values.reshape(top.shape)).ravel()
        rows, columns, values = rows[kept], columns[kept], values[kept]
    adjacency = np.zeros(similarity.shape, dtype=np.float32)
    adjacency[rows, columns] = values
    if symmetric:
        adjacency[columns, rows] = values
        np.fill_diagonal(adjacency, 0.0)
    return adjacency


def normalised_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """D^-½ (A + I) D^-½, with D the row sums of A + I (the GCN's propagation matrix)."""
    with_self = adjacency.astype(np.float64) + np.eye(adjacency.shape[0])
    scale = 1.0 / np.sqrt(with_self.sum(axis=1))
    return (scale[:, None] * with_self * scale[None, :]).astype(np.float32)


class GssNetwork(torch.nn.Module):
    """Residual graph convolutions of the descriptor's own width; a layer's output is the
    previous layer's pre-activation plus `layer_decay` times its own activation."""

    def __init__(self, dim: int, layers: int, layer_decay: float, init_std: float,
                 seed: int) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        weights = []
        for _ in range(layers):
            initial = rng.standard_normal((dim, dim)) * init_std
            np.fill_diagonal(initial, 1.0)
            weights.append(torch.nn.Parameter(torch.from_numpy(initial.astype(np.float32))))
        self.weights = torch.nn.ParameterList(weights)
        self.biases = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(dim))
                                             for _ in range(layers))
        self.layer_decay = layer_decay

    def forward(self, features: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        x, residual = features, None
        for weight, bias in zip(self.weights, self.biases, strict=True):
            before = torch.sparse.mm(adjacency, x) @ weight + bias
            x = torch.nn.functional.elu(before)
            if residual is not None:
                x = residual + self.layer_decay * x
            residual = before
        return torch.nn.functional.normalize(x, dim=1)

    def weight_penalty(self) -> torch.Tensor:
        """½ Σ w² over the layers' weights (not the biases), as the paper's code regularises."""
        return sum(0.5 * (weight ** 2).sum() for weight in self.weights)


def gss_loss(embeddings: torch.Tensor, beta: float) -> torch.Tensor:
    """-½ mean((relu(e eᵀ) - β)²): lowest when every similarity is far from β."""
    similarity = torch.relu(embeddings @ embeddings.T)
    return -0.5 * ((similarity - beta) ** 2).mean()


def guided_similarity_separation(queries: np.ndarray | None, gallery: np.ndarray,
                                 config: PostConfig | None = None,
                                 progress: ProgressCallback | None = None,
                                 edge_filter: EdgeFilter | None = None) -> GssResult:
    """Train GSS on `gallery` and return both sets' new descriptors; `queries` None means the
    queries are the gallery itself (one file all-vs-all). `progress` hears each epoch
    ("training GSS"). `edge_filter` keeps only the k-NN edges it verifies (GSS_V)."""
    config = config or PostConfig()
    if not 2 <= gallery.shape[0] <= MAX_GSS_IMAGES:
        raise InputError(f"GSS needs a gallery of 2 to {MAX_GSS_IMAGES} images (it holds "
                         f"gallery x gallery matrices), got {gallery.shape[0]}")
    started = time.perf_counter()
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    gallery_graph = knn_adjacency(gallery @ gallery.T, config.gss_k, symmetric=True,
                                  verify=_side(edge_filter, of_queries=False))
    network = GssNetwork(gallery.shape[1], config.gss_layers, config.gss_layer_decay,
                         config.gss_init_std, config.gss_seed)
    features = torch.from_numpy(gallery)
    propagation = _sparse(normalised_adjacency(gallery_graph))
    with torch.no_grad():
        untrained = network(features, propagation)
    beta = config.gss_beta if config.gss_beta is not None else float(np.percentile(
        (untrained @ untrained.T).numpy(), config.gss_beta_percentile))
    optimiser = torch.optim.Adam(network.parameters(), lr=config.gss_lr)
    losses = []
    epoch_done = track(progress, "training GSS", config.gss_epochs)
    for _ in range(config.gss_epochs):
        optimiser.zero_grad()
        loss = (gss_loss(network(features, propagation), beta)
                + config.gss_regularizer * network.weight_penalty())
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        epoch_done()
    with torch.no_grad():
        if queries is None:
            out_gallery = network(features, propagation).numpy()
            out_queries = out_gallery
        else:
            everything = _with_queries(np.ascontiguousarray(queries, dtype=np.float32), gallery,
                                       gallery_graph, config.gss_query_k,
                                       _side(edge_filter, of_queries=True))
            out = network(torch.from_numpy(np.concatenate([queries, gallery]).astype(
                np.float32)), _sparse(everything)).numpy()
            out_queries, out_gallery = out[:len(queries)], out[len(queries):]
    return GssResult(out_queries, out_gallery, beta, losses, time.perf_counter() - started)


def _with_queries(queries: np.ndarray, gallery: np.ndarray, gallery_graph: np.ndarray,
                  query_k: int, verify: Callable[[np.ndarray, np.ndarray], np.ndarray] | None
                  ) -> np.ndarray:
    """The propagation matrix of queries and gallery together: queries take their top
    `query_k` gallery images (those `verify` keeps) as neighbours, nothing takes a query as one
    (the paper's code)."""
    count = len(queries)
    graph = np.zeros((count + len(gallery),) * 2, dtype=np.float32)
    graph[:count, count:] = knn_adjacency(queries @ gallery.T, query_k, symmetric=False,
                                          verify=verify)
    graph[count:, count:] = gallery_graph
    return normalised_adjacency(graph)


def _side(edge_filter: EdgeFilter | None, of_queries: bool
          ) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """`edge_filter` for the rows of one side: the gallery's or the queries'."""
    if edge_filter is None:
        return None
    return lambda top, values: edge_filter(top, values, of_queries)


def _sparse(matrix: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(matrix).to_sparse()
