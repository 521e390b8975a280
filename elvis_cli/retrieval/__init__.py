"""Shortlists and re-ranking: global k-NN, the pair-scoring engine, the embedding cache."""
