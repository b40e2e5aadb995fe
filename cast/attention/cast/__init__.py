"""CAST: clustering self-attention with learnable surrogate tokens (van Engelenhoven et al., 2024).

layer.py is the mechanism (CASTAttention); clustering.py, blocks.py and combine.py are its steps.
"""

from cast.attention.cast.layer import CASTAttention

__all__ = ["CASTAttention"]
