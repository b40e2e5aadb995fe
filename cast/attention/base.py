"""The contract every attention mechanism in this folder follows.

A mechanism is an ``nn.Module`` built as ``Mechanism(d_model, n_heads, dropout=0.0, **options)``
whose ``forward(x, mask)`` maps ``x`` (batch, length, d_model) to ``y`` of the same shape.
``mask`` is a bool (batch, length) tensor, True on real tokens. Padded positions never influence
real ones and come out as exact zeros.

Shapes used throughout the package: B batch, h heads, N length, d head width, D = h*d.

Most mechanisms only differ in how they mix heads-split queries, keys and values; they subclass
:class:`Attention` and implement :meth:`Attention.attend`. Mechanisms that need more (CAST reads
``x`` for its gate, Reformer shares Q and K) override :meth:`Attention.forward` and still use the
shared projections, so parameter names (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) are the
same everywhere and a state dict moves between mechanisms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cast import options
from cast.options import OptionError


class Attention(nn.Module):
    """Multi-head attention skeleton: projections in, head merge and output projection out.

    Args:
        d_model: model width D of the input and output.
        n_heads: number of heads h.
        dropout: attention dropout probability (each mechanism applies it where it can).
        qkv_dim: total width of queries, keys and values (default ``d_model``); the LRA Image
            and Pathfinder protocols use a narrower one.
        shared_qk: build no key projection; keys are derived from queries (Reformer).
    """

    name = "attention"

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.0,
        qkv_dim: int | None = None,
        shared_qk: bool = False,
    ):
        super().__init__()
        qkv_dim = qkv_dim or d_model
        if qkv_dim % n_heads:
            raise ValueError(
                f"{type(self).__name__}: qkv_dim={qkv_dim} is not divisible by n_heads={n_heads}; "
                "choose model.qkv_dim (or model.d_model) as a multiple of model.n_heads"
            )
        self.d_model, self.n_heads, self.qkv_dim = d_model, n_heads, qkv_dim
        self.d_head = qkv_dim // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, qkv_dim)
        self.k_proj = None if shared_qk else nn.Linear(d_model, qkv_dim)
        self.v_proj = nn.Linear(d_model, qkv_dim)
        self.out_proj = nn.Linear(qkv_dim, d_model)

    def split_heads(self, t: Tensor) -> Tensor:
        """(B, N, h*d) -> (B, h, N, d)."""
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.d_head).transpose(1, 2)

    def merge_heads(self, t: Tensor) -> Tensor:
        """(B, h, N, d) -> (B, N, h*d)."""
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.qkv_dim)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Queries, keys and values split into heads; keys are None with ``shared_qk``."""
        if self.k_proj is None:
            q, v = linears(x, self.q_proj, self.v_proj)
            return self.split_heads(q), None, self.split_heads(v)
        return tuple(self.split_heads(t) for t in linears(x, self.q_proj, self.k_proj, self.v_proj))

    def output(self, y: Tensor, mask: Tensor) -> Tensor:
        """Merge heads of ``y`` (B, h, N, d), project, and zero the padded positions."""
        out = self.out_proj(self.merge_heads(y))
        # Nothing to zero where every position is real (about 4% of a CAST layer step at 4K on 2
        # CPU cores: the product and its backward each pass over the whole output).
        if known_unpadded(mask):
            return out
        # Not in place: the projection's output is a view of its 2-D matmul, and an in-place
        # product would cost a copy of the whole output in the backward pass (CopySlices). The
        # projection's output is freed at once (nothing saves it), so no second copy is kept.
        return out * mask.unsqueeze(-1).to(out.dtype)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Subclasses define ``attend(q, k, v, mask) -> (B, h, N, d)`` or override this."""
        check_inputs(x, mask)
        q, k, v = self.project(x)
        return self.output(self.attend(q, k, v, mask), mask)


def linears(x: Tensor, *layers: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(layer(x) for layer in layers)`` as one autograd node. Its backward pass sums the
    input gradients of all the projections in place (one matmul, then ``addmm_``), where autograd
    would add one full (B, N, D) gradient per projection; about 3% of a CAST layer step at 4K on
    2 CPU cores. Under autocast the products run in its dtype, as ``nn.Linear`` would."""
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    return _Linears.apply(x, *params)


class _Linears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *params):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.dtypes = x.dtype, [p.dtype if p is not None else None for p in params]
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            weights = [w.to(dtype) for w in params[0::2]]
            outs = [torch.addmm(b.to(dtype), x2, w.t()) if b is not None else x2 @ w.t()
                    for w, b in zip(weights, params[1::2])]
        ctx.save_for_backward(x2, *weights)
        ctx.lead = x.shape[:-1]
        ctx.set_materialize_grads(False)  # an unused projection's parameters get no gradient
        return tuple(out.view(*x.shape[:-1], -1) for out in outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, *weights = ctx.saved_tensors
        x_dtype, dtypes = ctx.dtypes
        grad_x, grad_params = None, []
        for i, (grad, w) in enumerate(zip(grads, weights)):
            if grad is None:
                grad_params += [None, None]
                continue
            grad = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = grad @ w if grad_x is None else grad_x.addmm_(grad, w)
            grad_w = (grad.t() @ x2).to(dtypes[2 * i]) if ctx.needs_input_grad[1 + 2 * i] else None
            bias_dtype = dtypes[2 * i + 1]
            wants_bias = bias_dtype is not None and ctx.needs_input_grad[2 + 2 * i]
            grad_b = grad.sum(0).to(bias_dtype) if wants_bias else None
            grad_params += [grad_w, grad_b]
        if grad_x is not None:
            grad_x = grad_x.view(*ctx.lead, -1).to(x_dtype)
        return (grad_x, *grad_params)


def known_unpadded(mask: Tensor) -> bool:
    """True when every position of ``mask`` is real and checking it costs nothing: a host check,
    made on a CPU in eager mode only (on an accelerator it would synchronise; compiled, it would
    break the graph). False means "not known", and the masked path gives the same result."""
    return mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all())


def check_inputs(x: Tensor, mask: Tensor) -> None:
    """Refuse inputs outside the contract with a message that says what was expected."""
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(
            f"attention expects x (batch, length, d_model) and mask (batch, length); got x "
            f"{tuple(x.shape)} and mask {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be bool (True on real tokens), got {mask.dtype}")


# The mechanisms' option checks: cast.options' with the group "attention".
def option_error(mechanism: str, field: str, value, expected: str) -> OptionError:
    return options.option_error("attention", mechanism, field, value, expected)


def require_positive(mechanism: str, **values: int) -> None:
    options.require_positive("attention", mechanism, **values)


def require_choice(mechanism: str, field: str, value, choices: tuple):
    return options.require_choice("attention", mechanism, field, value, choices)


def key_padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive bias (B, 1, 1, N): 0 on real keys, the dtype's most negative value on padding.

    A finite value (not -inf) keeps rows with no real key finite instead of NaN.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )[:, None, None, :]
