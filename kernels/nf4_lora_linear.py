"""``lorafx::nf4_lora_linear``: a QLoRA layer — NF4 base weight and LoRA branch — as one op.

    y = x · deq(W)ᵀ (+ bias) + scale · (x_lora · Aᵀ) · Bᵀ        x_lora = x when not given

W is given as the arguments of ``lorafx::nf4_dequant`` (bitsandbytes layout, any
blocksize, with or without double quantization) and is dequantized to x's dtype. On CUDA
the ``lora_matmul`` Triton kernels decode W tile by tile inside the matmul, forward and
backward, so the 16-bit W is never written to memory; inputs of at most 16 rows (decoding)
take the split-K GEMV configs, which read each 4-bit weight byte once. Off CUDA the op runs
the plain-PyTorch reference below, which is also what the tests compare the kernels to.
A and B may both be None (scale is then unused): a plain NF4 linear layer, for layers without LoRA.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

from .lora_matmul import NF4Operand, check_lora_args, lora_backward, lora_matmul
from .nf4 import check_nf4_args, dequantize_nf4, dequantize_nf4_cpu

_OP = "lorafx::nf4_lora_linear"


def check_nf4_lora_linear_args(x, nf4_args, shape, A, B, bias, x_lora) -> None:
    """Raise ValueError unless the NF4 weight, x, the LoRA factors and bias describe one layer.

    ``nf4_args`` are the op's (packed, absmax, quant_map, nested_absmax, nested_quant_map,
    offset, blocksize). The weight's row length must be even: the kernels read whole
    bytes per row, and bitsandbytes' flat layout lets a byte straddle two rows otherwise.
    """
    if len(shape) != 2:
        raise ValueError(f"{_OP}: shape={list(shape)}; expected [out_features, in_features]")
    check_nf4_args(*nf4_args, shape)
    if shape[1] % 2:
        raise ValueError(f"{_OP}: shape={list(shape)}; in_features must be even (whole bytes per row)")
    if nf4_args[0].device != x.device:
        raise ValueError(f"{_OP}: the NF4 weight is on {nf4_args[0].device} but x is on {x.device}")
    check_lora_args(_OP, x, shape[0], shape[1], A, B, bias, x_lora)


def _dequantize(packed, *args) -> Tensor:
    """The op's plain-PyTorch dequantization: the fast CPU path on CPU (the same bits), else the reference."""
    return (dequantize_nf4_cpu if packed.device.type == "cpu" else dequantize_nf4)(packed, *args)


def nf4_lora_linear_reference(
    x, packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, A, B, scale,
    bias=None, x_lora=None,
) -> Tensor:  # fmt: skip
    """The unfused graph's arithmetic, op for op: nf4_dequant to x's dtype, linear, LoRA branch, add."""
    w = _dequantize(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, x.dtype)
    y = F.linear(x, w, bias)
    if A is None:
        return y
    return y + F.linear(F.linear(x if x_lora is None else x_lora, A), B) * scale


@torch.library.custom_op(_OP, mutates_args=())
def nf4_lora_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    shape: list[int],
    A: Tensor | None,
    B: Tensor | None,
    scale: float,
    bias: Tensor | None,
    x_lora: Tensor | None,
) -> Tensor:
    """``x · deq(W)ᵀ (+ bias) + scale · (x_lora · Aᵀ) · Bᵀ`` as one node; the torch reference off CUDA."""
    nf4_args = (packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize)
    check_nf4_lora_linear_args(x, nf4_args, shape, A, B, bias, x_lora)
    return nf4_lora_linear_reference(x, *nf4_args, shape, A, B, scale, bias, x_lora)


@nf4_lora_linear.register_kernel("cuda")
def nf4_lora_linear_cuda(x, *args):
    *nf4_args, shape, A, B, scale, bias, x_lora = args
    check_nf4_lora_linear_args(x, nf4_args, shape, A, B, bias, x_lora)
    return nf4_lora_linear_triton(x, NF4Operand(*nf4_args), shape, A, B, scale, bias, x_lora)


@nf4_lora_linear.register_fake
def _(x, *args):
    *nf4_args, shape, A, B, scale, bias, x_lora = args
    check_nf4_lora_linear_args(x, nf4_args, shape, A, B, bias, x_lora)
    return x.new_empty((*x.shape[:-1], shape[0]))


def nf4_lora_linear_triton(x, weight: NF4Operand, shape, A, B, scale, bias=None, x_lora=None, config=None) -> Tensor:
    """The fused forward (arguments already checked). ``config`` pins a tile config (tests)."""
    n, k = shape
    x2 = x.reshape(-1, k)
    # The LoRA-down product, once for all output tiles (see lora_matmul's module docstring).
    down = (x2 if x_lora is None else x_lora.reshape(-1, k)) @ A.T if A is not None else None
    y = lora_matmul(
        x2, weight, transpose_w=False, out_features=n, down=down, up=B.T if B is not None else None,
        scale=scale, bias=bias, config=config,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def nf4_lora_linear_grad_input_reference(
    dy, packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, u, A, scale
) -> Tensor:
    """The input gradient the plain-PyTorch way (the CPU path of lorafx::nf4_lora_linear_grad_input)."""
    w = _dequantize(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dy.dtype)
    dx = dy @ w
    return dx if u is None else dx + (u @ A) * scale


@torch.library.custom_op("lorafx::nf4_lora_linear_grad_input", mutates_args=())
def nf4_lora_linear_grad_input(
    dy: Tensor,
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    shape: list[int],
    u: Tensor | None,
    A: Tensor | None,
    scale: float,
) -> Tensor:
    """``dy · deq(W) (+ scale · u · A)`` for 2-D dy: the input gradient of ``nf4_lora_linear`` (u = dy · B)."""
    nf4_args = (packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize)
    return nf4_lora_linear_grad_input_reference(dy, *nf4_args, shape, u, A, scale)


@nf4_lora_linear_grad_input.register_kernel("cuda")
def nf4_lora_linear_grad_input_cuda(dy, *args):
    *nf4_args, shape, u, A, scale = args
    return nf4_lora_linear_grad_input_triton(dy, NF4Operand(*nf4_args), shape, u, A, scale)


@nf4_lora_linear_grad_input.register_fake
def _(dy, *args):
    shape = args[-4]
    return dy.new_empty((dy.shape[0], shape[1]))


def nf4_lora_linear_grad_input_triton(dy, weight: NF4Operand, shape, u, A, scale, config=None) -> Tensor:
    """The fused input gradient: W decoded tile by tile and read untransposed, LoRA term in the epilogue."""
    return lora_matmul(
        dy, weight, transpose_w=True, out_features=shape[1], down=u, up=A if u is not None else None,
        scale=scale, bias=None, config=config,
    )  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, *nf4_tensors, blocksize, shape, A, B, scale, bias, x_lora = inputs
    ctx.save_for_backward(x, *nf4_tensors, A, B, x_lora)
    ctx.blocksize, ctx.shape, ctx.scale = blocksize, shape, scale


def _backward(ctx, dy):
    x, *nf4_tensors, A, B, x_lora = ctx.saved_tensors
    need = dict(zip(_ARG_NAMES, ctx.needs_input_grad))
    weight = (*nf4_tensors, ctx.blocksize, ctx.shape)
    dx, dx_lora, da, db, dbias = lora_backward(
        (need["x"], need["x_lora"], need["A"], need["B"], need["bias"]),
        dy,
        x,
        x_lora,
        A,
        B,
        ctx.scale,
        lambda dy2, u: torch.ops.lorafx.nf4_lora_linear_grad_input(dy2, *weight, u, A, ctx.scale),
    )
    # The NF4 storage is frozen: no gradient for it, as for lorafx::nf4_dequant.
    grads = {"x": dx, "A": da, "B": db, "bias": dbias, "x_lora": dx_lora}
    return tuple(grads.get(name) for name in _ARG_NAMES)


_ARG_NAMES = list(inspect.signature(nf4_lora_linear_reference).parameters)  # the op's arguments, in order
nf4_lora_linear.register_autograd(_backward, setup_context=_setup_context)
