"""Flax NNX decoder-only transformer models."""

from research.models.transformer import Transformer

__all__ = ["Transformer"]
