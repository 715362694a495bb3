"""Fermion: pretrain, post-train, evaluate and ship a small language model."""

__version__ = "0.1.0"
