"""Attention mechanisms, one per file, all following the contract in :mod:`cast.attention.base`."""

from cast.attention.base import Attention

__all__ = ["Attention"]
