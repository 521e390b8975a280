"""Descriptors on disk: images, extraction, our sharded files, the authors' released files."""
