"""``lorafx::lora_linear``: a 16-bit (or float32) linear layer and its LoRA branch as one op.

    y = x · Wᵀ (+ bias) + scale · (x_lora · Aᵀ) · Bᵀ        x_lora = x when not given

This file holds the op's plain-PyTorch reference (the CPU path and what tests compare
against), the CUDA launcher (the ``lora_matmul`` Triton kernel family: base product,
LoRA-up and bias in one kernel) and the autograd formula. ``x_lora`` is the input the
LoRA branch sees: the output of the LoRA dropout module, which stays in the graph so it
follows ``.train()`` / ``.eval()`` and draws the same random mask as the unfused graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .lora_matmul import check_lora_args, lora_backward, lora_matmul

_OP = "lorafx::lora_linear"


def check_lora_linear_args(x, weight, A, B, bias, x_lora) -> None:
    """Raise ValueError unless the arguments describe one linear layer with a LoRA branch."""
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight has shape {tuple(weight.shape)}; expected (out_features, in_features)")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"{_OP}: weight is {weight.dtype} on {weight.device} but x is {x.dtype} on {x.device}")
    check_lora_args(_OP, x, weight.shape[0], weight.shape[1], A, B, bias, x_lora)


def lora_linear_reference(x, weight, A, B, scale, bias=None, x_lora=None) -> Tensor:
    """The unfused graph's arithmetic, op for op: linear, then linear(linear(x_lora, A), B) · scale, then add."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x if x_lora is None else x_lora, A), B) * scale


@torch.library.custom_op(_OP, mutates_args=())
def lora_linear(
    x: Tensor,
    weight: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    bias: Tensor | None,
    x_lora: Tensor | None,
) -> Tensor:
    """``x · Wᵀ (+ bias) + scale · (x_lora · Aᵀ) · Bᵀ`` as one node; the torch reference off CUDA."""
    check_lora_linear_args(x, weight, A, B, bias, x_lora)
    return lora_linear_reference(x, weight, A, B, scale, bias, x_lora)


@lora_linear.register_kernel("cuda")
def lora_linear_cuda(x, weight, A, B, scale, bias, x_lora):
    check_lora_linear_args(x, weight, A, B, bias, x_lora)
    return lora_linear_triton(x, weight, A, B, scale, bias, x_lora)


@lora_linear.register_fake
def _(x, weight, A, B, scale, bias, x_lora):
    check_lora_linear_args(x, weight, A, B, bias, x_lora)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def lora_linear_triton(x, weight, A, B, scale, bias=None, x_lora=None, config=None) -> Tensor:
    """The fused forward (arguments already checked). ``config`` pins a tile config (tests)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    # The LoRA-down product, once for all output tiles (see lora_matmul's module docstring).
    down = (x2 if x_lora is None else x_lora.reshape(-1, k)) @ A.T
    y = lora_matmul(
        x2, weight, transpose_w=False, out_features=n, down=down, up=B.T, scale=scale, bias=bias, config=config
    )
    return y.reshape(*x.shape[:-1], n)


def lora_linear_grad_input_reference(dy, weight, u, A, scale) -> Tensor:
    """The input gradient the plain-PyTorch way (the CPU path of lorafx::lora_linear_grad_input)."""
    dx = dy @ weight
    return dx if u is None else dx + (u @ A) * scale


@torch.library.custom_op("lorafx::lora_linear_grad_input", mutates_args=())
def lora_linear_grad_input(dy: Tensor, weight: Tensor, u: Tensor | None, A: Tensor, scale: float) -> Tensor:
    """``dy · W (+ scale · u · A)`` for 2-D dy: the input gradient of ``lora_linear`` (u = dy · B)."""
    return lora_linear_grad_input_reference(dy, weight, u, A, scale)


@lora_linear_grad_input.register_kernel("cuda")
def lora_linear_grad_input_cuda(dy, weight, u, A, scale):
    return lora_linear_grad_input_triton(dy, weight, u, A, scale)


@lora_linear_grad_input.register_fake
def _(dy, weight, u, A, scale):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


def lora_linear_grad_input_triton(dy, weight, u, A, scale, config=None) -> Tensor:
    """The fused input gradient: the forward kernel reading W untransposed, LoRA term in the epilogue."""
    return lora_matmul(
        dy, weight, transpose_w=True, out_features=weight.shape[1], down=u, up=A if u is not None else None,
        scale=scale, bias=None, config=config,
    )  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, weight, A, B, scale, bias, x_lora = inputs
    ctx.save_for_backward(x, weight, A, B, x_lora)
    ctx.scale = scale


def _backward(ctx, dy):
    x, weight, A, B, x_lora = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_bias, need_x_lora = ctx.needs_input_grad
    dx, dx_lora, da, db, dbias = lora_backward(
        (need_x, need_x_lora, need_a, need_b, need_bias),
        dy,
        x,
        x_lora,
        A,
        B,
        ctx.scale,
        lambda dy2, u: torch.ops.lorafx.lora_linear_grad_input(dy2, weight, u, A, ctx.scale),
    )
    # The base weight is frozen in LoRA training; its gradient is still right if asked for.
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if need_w else None
    return dx, dw, da, db, None, dbias, dx_lora


lora_linear.register_autograd(_backward, setup_context=_setup_context)
