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
        if self.training and self.dropout > 0:
            # Each (head, key) enters the numerator with weight 1 (0 when dropped); padded keys
            # have zero features, so without dropout v needs no mask.
            v = v * F.dropout(mask[:, None, :, None].to(v.dtype).expand(*v.shape[:3], 1), self.dropout)
        with torch.autocast(q.device.type, enabled=False):
            out = favor(q.float(), k.float(), v.float(), mask, self.features.float())
        return out.to(v.dtype)


def favor(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, features: Tensor) -> Tensor:
    """Linear attention with positive random features: q, k, v (B, h, N, d), mask (B, N),
    features (m, d) -> (B, h, N, d)."""
    return _Favor.apply(q, k, v, mask[:, None, :, None], features)


class _Favor(torch.autograd.Function):
    """FAVOR+ with a hand-written backward pass, for speed: the (B, h, N, m) features dominate the
    cost and autograd would save and traverse several of them per input (exponent, shift,
    exponential, stabiliser, mask). Here each side keeps one tensor, its shifted exponentials E, and
    every other step is folded into a matmul:
    - the exponent's −‖x‖²/2 is an extra input column against a column of ones in W, and the same
      ones give the row sums of the exponent's gradient in the backward pass;
    - the normaliser is an extra column of ones next to V, so numerator and denominator are one
      product: R = φ(Q) [φ(K)ᵀ [V 1]], out = R[:d] / R[d];
    - the stabiliser s is never added to E: φ = E + s (keys: + s on real keys only) enters the
      products as a rank-one term, Eᵀ[V 1] + s Σ_real [V 1], and E [C] + s Σ_m C.
    The shifts are constants (detached), as in FAVOR+.
    """

    @staticmethod
    def forward(ctx, q, k, v, real, features):
        d = q.shape[-1]
        weights = torch.cat([features * d ** -0.25, features.new_ones(features.shape[0], 1)], dim=1)
        query_exp, key_exp = exponentials(q, weights, None), exponentials(k, weights, real)
        values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        context = key_exp.transpose(-1, -2) @ values + STABILISER * (values * real).sum(-2, keepdim=True)
        result = query_exp @ context + STABILISER * context.sum(-2, keepdim=True)
        ctx.save_for_backward(q, k, real, weights, query_exp, key_exp, values, context, result)
        # φ's 1/√m cancels in the ratio.
        return result[..., :d] / result[..., d:]

    @staticmethod
    def backward(ctx, grad):
        q, k, real, weights, query_exp, key_exp, values, context, result = ctx.saved_tensors
        d = q.shape[-1]
        denominator = result[..., d:]
        out = result[..., :d] / denominator
        grad_result = torch.cat([grad, -(grad * out).sum(-1, keepdim=True)], dim=-1) / denominator
        grad_context = query_exp.transpose(-1, -2) @ grad_result + STABILISER * grad_result.sum(-2, keepdim=True)
        grad_query = exponent_grad(q, (grad_result @ context.transpose(-1, -2)).mul_(query_exp), weights)
        grad_key = exponent_grad(k, (values @ grad_context.transpose(-1, -2)).mul_(key_exp), weights)
        grad_values = key_exp @ grad_context + STABILISER * real * grad_context.sum(-2, keepdim=True)
        return grad_query, grad_key, grad_values[..., :d], None, None


def exponentials(x: Tensor, weights: Tensor, real: Tensor | None) -> Tensor:
    """exp of the shifted exponents of φ(x / d^¼) for x (B, h, N, d) -> (B, h, N, m), all ≤ 1;
    ``weights`` (m, d + 1) is [W / d^¼, 1].

    Queries (``real`` None) are shifted by their own maximum. Keys are shifted by the maximum over
    the real keys (``real`` (B, 1, N, 1)) and all features of their (batch, head); padded keys
    get the most negative exponent, so padding never sets the shift and its exponentials are zero.
    """
    square = (x * x).sum(-1, keepdim=True) * (-0.5 * x.shape[-1] ** -0.5)
    if real is not None:
        square = square.masked_fill(~real, torch.finfo(x.dtype).min)
    exponent = torch.cat([x, square], dim=-1) @ weights.transpose(-1, -2)
    shift = exponent.amax(-1 if real is None else (-2, -1), keepdim=True)
    return exponent.sub_(shift).exp_()


def exponent_grad(x: Tensor, grad_exponent: Tensor, weights: Tensor) -> Tensor:
    """Gradient for x of the exponent x/d^¼·w − ‖x‖²/(2√d), from the exponent's (B, h, N, m);
    the ones column of ``weights`` yields the row sums the ‖x‖² term needs."""
    grad = grad_exponent @ weights
    d = x.shape[-1]
    return grad[..., :d] - grad[..., d:] * x * d ** -0.5


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
