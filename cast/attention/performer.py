"""Performer (FAVOR+): Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.

Softmax attention is approximated with positive orthogonal random features. With x = q/d^¼ (or
k/d^¼), so that exp(q·k/√d) = exp(x_q·x_k), the feature map
    φ(x) = exp(Wx − ‖x‖²/2) / √m
satisfies E[φ(x_q)·φ(x_k)] = exp(x_q·x_k) when the m rows of W are Gaussian. The rows are drawn in
orthogonal blocks of d (Q of the QR of a Gaussian d x d matrix) and rescaled by chi-distributed
norms (norms of Gaussian d-vectors), which keeps the estimator unbiased and lowers its variance.
The paper's ω are the rows of ``features``, its Q' and K' are ``query_features`` and
``key_features``. Attention is then linear in length:
    out = φ(Q) (φ(K)ᵀ V) / φ(Q) (φ(K)ᵀ 1).
Padded keys have zero features, so they leave numerator and denominator.

Numerical stabilisation (as in FAVOR+): before the exponential each query's exponents are
shifted by their own maximum and all key exponents of a (batch, head) by one shared maximum over
the real keys. Both shifts are constants that cancel in the ratio. FAVOR+ shifts by the maximum of
Wx alone; the maximum of the whole exponent is used here, so the largest feature is exactly 1 and
the additive stabiliser below is negligible next to it. As in FAVOR+ (and LRA's softmax Performer)
1e-6 is added to every query feature and every real key's, so the denominator stays positive
when features underflow. One draw of features serves all heads (as in FAVOR+). The whole
computation runs in float32, also under bf16 autocast.

Features are a buffer (saved with the model, so evaluation from a checkpoint uses the same ones).
They are redrawn every ``redraw_interval`` training forward calls, counted in a buffer; each draw
serves exactly that many calls, and eval never redraws or counts. With gradient accumulation a
"step" here is one forward call. Dropout drops whole keys from the numerator (each (head, key)
with the given probability, survivors scaled up), attention dropout with one mask per key column.

Cost per head: O(N·m·d) time, O(N·m + m·d) memory; never an N x N tensor.

Shapes: B batch, h heads, N length, d head width, m random features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cast.attention.base import Attention, option_error, require_positive

# Added to every real feature (FAVOR+'s numerical stabiliser); the largest feature is 1.
STABILISER = 1e-6


class PerformerAttention(Attention):
    """FAVOR+ attention with positive orthogonal random features.

    Args:
        num_features: number of random features m.
        redraw_interval: training forward calls served by each draw of features; 0 or None
            keeps the first draw forever.
    """

    name = "performer"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        num_features: int = 256,
        redraw_interval: int | None = 1000,
        **kw,
    ):
        super().__init__(d_model, n_heads, dropout, **kw)
        require_positive(self.name, num_features=num_features)
        if redraw_interval is not None and (not isinstance(redraw_interval, int) or redraw_interval < 0):
            raise option_error(self.name, "redraw_interval", redraw_interval,
                               "a non-negative integer (0 or null: never redraw)")
        self.num_features = num_features
        self.redraw_interval = redraw_interval or 0
        self.register_buffer("features", orthogonal_gaussian(num_features, self.d_head))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def redraw(self) -> None:
        """Replace the random features with a fresh draw (from torch's global generator)."""
        self.features.copy_(orthogonal_gaussian(self.num_features, self.d_head, self.features.device))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        if self.training:
            if self.redraw_interval and self.calls > 0 and self.calls % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        # Each (head, key) enters the numerator with weight 1 (0 when padded or dropped).
        keep = F.dropout(mask[:, None, :, None].float().expand(*v.shape[:3], 1), self.dropout, self.training)
        with torch.autocast(q.device.type, enabled=False):
            out = favor(q.float(), k.float(), v.float() * keep, mask, self.features.float())
        return out.to(v.dtype)


def favor(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, features: Tensor) -> Tensor:
    """Linear attention with positive random features: q, k, v (B, h, N, d), mask (B, N),
    features (m, d) -> (B, h, N, d)."""
    query_features = torch.exp(exponents(q, features, None)) + STABILISER
    real = mask[:, None, :, None]
    key_features = (torch.exp(exponents(k, features, real)) + STABILISER) * real
    context = key_features.transpose(-1, -2) @ v
    normaliser = query_features @ key_features.sum(-2).unsqueeze(-1)
    # φ's 1/√m cancels in the ratio.
    return query_features @ context / normaliser


def exponents(x: Tensor, features: Tensor, real: Tensor | None) -> Tensor:
    """Shifted exponents of φ(x / d^¼) for x (B, h, N, d) -> (B, h, N, m), all ≤ 0.

    Queries (``real`` None) are shifted by their own maximum. Keys are shifted by the maximum over
    the real keys (``real`` (B, 1, N, 1)) and all features of their (batch, head); padded keys get
    -inf, so padding never sets the shift and its features come out as zero.
    """
    x = x / x.shape[-1] ** 0.25
    exponent = x @ features.transpose(-1, -2) - (x * x).sum(-1, keepdim=True) / 2
    if real is None:
        return exponent - exponent.amax(-1, keepdim=True).detach()
    exponent = exponent.masked_fill(~real, float("-inf"))
    return exponent - exponent.amax((-2, -1), keepdim=True).detach()


def orthogonal_gaussian(rows: int, columns: int, device: torch.device | str | None = None) -> Tensor:
    """(rows, columns) matrix whose blocks of ``columns`` rows are orthogonal, with row norms
    distributed like those of Gaussian vectors (chi with ``columns`` degrees of freedom)."""
    blocks = math.ceil(rows / columns)
    q, r = torch.linalg.qr(torch.randn(blocks, columns, columns, device=device))
    # Householder QR leans towards one orientation; the signs of R's diagonal make each block
    # uniformly (Haar) distributed, without which the estimator is biased and its error stops
    # falling as m grows.
    q = q * torch.diagonal(r, dim1=-2, dim2=-1).sign().unsqueeze(-2)
    orthogonal = q.transpose(-1, -2).reshape(-1, columns)[:rows]
    norms = torch.randn(rows, columns, device=device).norm(dim=-1, keepdim=True)
    return orthogonal * norms
