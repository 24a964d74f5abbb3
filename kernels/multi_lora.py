"""``lorafx::multi_lora``: many LoRA adapters in one batch (BGMV/SGMV, as in Punica and S-LoRA).

    y[t] = scales[k] · (x[t] · A[k]ᵀ) · B[k]ᵀ        k = ids[t // (T // G)];  y[t] = 0 where k = -1

x is flattened to T rows; A (n, r, in) and B (n, out, r) are banks of n adapters whose
ranks are zero-padded to a common r (the padding contributes zeros to both products).
One id serves T // G consecutive rows, so ids per batch row fit a (batch, seq, in) input
and its (batch·seq, in) view alike, and decoding (T // G = 1) is one id per row. The op
computes the LoRA term only; the caller adds it to the base layer's output.

Off CUDA the op runs the torch reference: two F.linear when every row has one adapter,
else the banks gathered per group and two batched matmuls (BGMV in torch). On
CUDA two Triton kernels, SGMV-style: the rows of a group are consecutive, so a program
takes a tile of rows inside one group, all under one adapter, and can use ``tl.dot``.
- shrink: down (T, R_PAD) float32 = x · A[k]ᵀ, optionally split over ``in`` with atomic
  adds (decoding: few rows and a long reduction, so splitting is what fills the GPU);
- expand: y = (scale · down) · B[k]ᵀ over (row, out) tiles; rows with id -1 write zeros.
Not one fused kernel: it would recompute the shrink for every output tile (the reasoning
of lora_matmul's module docstring). Validating ids against n needs their values on the
host, a sync, which the eager paths accept and the fake impl (tracing) cannot do.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .lora_matmul import COMPUTE_DTYPES, _dot
from .triton_launch import MAX_INDEX, dot_precision, interpreting, launch

_OP = "lorafx::multi_lora"
_ID_DTYPES = (torch.int64, torch.int32)


def check_multi_lora_args(x, A, B, scales, ids) -> None:
    """Raise ValueError unless the arguments describe a bank of adapters and rows to apply them to."""
    if x.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{_OP}: x is {x.dtype}; allowed: {', '.join(map(str, COMPUTE_DTYPES))}")
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"{_OP}: A has shape {tuple(A.shape)} and B {tuple(B.shape)}; expected banks (n, r, in) and (n, out, r)"
        )
    n, r, d_in = A.shape
    if B.shape[0] != n or B.shape[2] != r or n < 1 or r < 1:
        raise ValueError(
            f"{_OP}: banks disagree: A has shape {tuple(A.shape)} (n, r, in) but B {tuple(B.shape)}; "
            f"expected B ({n}, out, {r}) with n, r >= 1"
        )
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(
            f"{_OP}: x has shape {tuple(x.shape)}; its last dimension must be in={d_in} of A {tuple(A.shape)}"
        )
    for name, t in {"A": A, "B": B}.items():
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{_OP}: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    if tuple(scales.shape) != (n,) or scales.dtype != torch.float32 or scales.device != x.device:
        raise ValueError(
            f"{_OP}: scales is {scales.dtype} of shape {tuple(scales.shape)} on {scales.device}; "
            f"expected float32 of shape ({n},) on {x.device}"
        )
    if ids.dtype not in _ID_DTYPES or ids.dim() != 1 or ids.device != x.device:
        raise ValueError(
            f"{_OP}: ids is {ids.dtype} of shape {tuple(ids.shape)} on {ids.device}; "
            f"expected 1-D int64 (or int32) adapter indices on {x.device}"
        )
    t = math.prod(x.shape[:-1])  # not Size.numel(): that makes a symbolic width concrete under torch.compile
    if ids.shape[0] == 0 or t % ids.shape[0]:
        raise ValueError(f"{_OP}: x has {t} rows, which do not split into {ids.shape[0]} equal groups (one per id)")


def check_adapter_ids(ids: Tensor, n: int) -> None:
    """Raise ValueError unless every id is -1 or an adapter of the bank. Reads ids on the host (a sync)."""
    bad = ids[(ids < -1) | (ids >= n)]
    if bad.numel():
        raise ValueError(
            f"{_OP}: ids holds {int(bad[0])}, not an adapter of the {n} in the bank (allowed: -1 = none, 0 .. {n - 1})"
        )


_last = (None, -1, 0, [])  # (weakref to ids, its _version, bank size, distinct ids) of the last check


def distinct_ids(ids: Tensor, n: int) -> list[int]:
    """check_adapter_ids, then the distinct ids, read once per value of `ids`: every layer of a
    decode step reads the same ids buffer, so the host sync happens once a step, not once a layer.
    The buffer's in-place version counter says when it changed."""
    global _last
    ref, version, size, used = _last
    try:
        now = ids._version
    except RuntimeError:  # an inference tensor has no version counter: no caching
        now = None
    if now is not None and ref is not None and ref() is ids and version == now and size == n:
        return used
    check_adapter_ids(ids, n)
    used = ids.unique().tolist()
    if now is not None:
        _last = (weakref.ref(ids), now, n, used)
    return used


def multi_lora_reference(x, A, B, scales, ids, used: list[int] | None = None) -> Tensor:
    """One adapter for every row (set_adapter): ``linear(linear(x, A[k]), B[k]) · scales[k]``.
    Mixed rows: the banks gathered per group and two batched matmuls (BGMV in torch: no loop
    over adapters, no host sync); id -1 gets scale 0. The gathered banks (groups, r, in + out)
    are never larger than the activations (groups · rows per group, in + out)."""
    used = ids.unique().tolist() if used is None else used
    if len(used) == 1 and used[0] >= 0:  # no gather
        k = used[0]
        return F.linear(F.linear(x, A[k]), B[k]) * scales[k]
    if used == [-1]:
        return x.new_zeros((*x.shape[:-1], B.shape[1]))
    return multi_lora_gathered(x, A, B, scales, ids)


def multi_lora_gathered(x, A, B, scales, ids) -> Tensor:
    """The op as plain aten ops with no host sync (ids unchecked: the caller checked them): each
    group's A and B gathered, two batched matmuls, scale 0 for id -1. What the compile backend
    traces on CPU (passes/adapter_bank.py inline_multi_lora), so Inductor fuses it."""
    k = ids.clamp(min=0)
    x3 = x.reshape(ids.shape[0], -1, A.shape[2])  # (groups, rows per group, in)
    y = torch.bmm(torch.bmm(x3, A[k].transpose(1, 2)), B[k].transpose(1, 2))
    scale = torch.where(ids >= 0, scales[k], 0.0)[:, None, None]  # as `y * scales[k]`: float32 math, then x's dtype
    return (y.float() * scale).to(x.dtype).reshape(*x.shape[:-1], B.shape[1])


@triton.jit
def _group_tile(ids_ptr, S, BM: tl.constexpr):
    """This program's row tile: (adapter id, row indices, row mask). Tiles never cross groups."""
    tiles = tl.cdiv(S, BM)
    group = tl.program_id(0) // tiles
    within = (tl.program_id(0) % tiles) * BM + tl.arange(0, BM)
    return tl.load(ids_ptr + group), group * S + within, within < S


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, ids_ptr, down_ptr, S, IN, R, stride_xt, stride_an, stride_ar, stride_ai,
    S_BUCKET, T_BUCKET,  # autotuning keys only: one config per power-of-two range
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """down[rows] (+)= x[rows] · A[k]ᵀ over the program_id(1)-th of SPLIT_K slices of IN; nothing for id -1."""
    k, rows, row_mask = _group_tile(ids_ptr, S, BM)
    if k >= 0:
        rr = tl.arange(0, R_PAD)
        per_split = tl.cdiv(tl.cdiv(IN, BK), SPLIT_K) * BK
        begin = tl.program_id(1) * per_split
        end = tl.minimum(IN, begin + per_split)
        acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
        for c0 in range(begin, end, BK):
            rc = c0 + tl.arange(0, BK)
            x_mask = row_mask[:, None] & (rc[None, :] < end)
            x = tl.load(x_ptr + rows[:, None] * stride_xt + rc[None, :], mask=x_mask, other=0.0)
            a_offsets = k * stride_an + rc[:, None] * stride_ai + rr[None, :] * stride_ar
            a = tl.load(a_ptr + a_offsets, mask=(rc[:, None] < end) & (rr[None, :] < R), other=0.0)
            acc = _dot(x, a, acc, DOT_PRECISION, UPCAST_DOT)
        out = down_ptr + rows[:, None] * R_PAD + rr[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=row_mask[:, None])
        else:
            tl.atomic_add(out, acc, mask=row_mask[:, None])


@triton.jit
def _expand_kernel(
    down_ptr, b_ptr, scales_ptr, ids_ptr, y_ptr, S, OUT, R, stride_bn, stride_bo, stride_br, stride_yt,
    S_BUCKET, T_BUCKET,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """y[rows, cols] = scales[k] · down[rows] · B[k][cols]ᵀ, or zeros for id -1."""
    k, rows, row_mask = _group_tile(ids_ptr, S, BM)
    rj = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if k >= 0:
        rr = tl.arange(0, R_PAD)
        down = tl.load(down_ptr + rows[:, None] * R_PAD + rr[None, :], mask=row_mask[:, None], other=0.0)
        # Scaling the (BM, r) tile, not the (BM, BN) product, lets the dot accumulate into acc;
        # the cast makes it a 16-bit tensor-core dot for 16-bit banks (accumulating in float32).
        down = (down * tl.load(scales_ptr + k)).to(b_ptr.dtype.element_ty)
        b_offsets = k * stride_bn + rr[:, None] * stride_br + rj[None, :] * stride_bo
        b = tl.load(b_ptr + b_offsets, mask=(rr[:, None] < R) & (rj[None, :] < OUT), other=0.0)
        acc = _dot(down, b, acc, DOT_PRECISION, UPCAST_DOT)
    y_mask = row_mask[:, None] & (rj[None, :] < OUT)
    tl.store(y_ptr + rows[:, None] * stride_yt + rj[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _shrink_config(bm, bk, split_k, warps, stages):
    return triton.Config({"BM": bm, "BK": bk, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages)


def _expand_config(bm, bn, warps):
    # No reduction loop in the expand (the whole rank is one tile), so nothing to pipeline.
    return triton.Config({"BM": bm, "BN": bn}, num_warps=warps, num_stages=1)


# Candidates, not GPU-timed yet (no GPU here). BM = 16, the smallest tl.dot tile, for
# decoding (a group is one row); larger BM for prefill (a group is a sequence). Both
# kernels stream a bank slice and x or y through a rank-r bottleneck, so they are
# memory-bound; the shrink splits ``in`` (SPLIT_K) so that decoding a few sequences still
# runs enough programs to fill the SMs, as Punica's BGMV shrink does. Every config compiles
# for sm_90 without spills at R_PAD 16, 32, 64 and 128 (the test checks 128 and 64);
# BM = 16 tiles needed 8 warps for that. The first of each list is the one the interpreter
# runs (the atomic path); the tests pin others.
SHRINK_CONFIGS = [  # (BM, BK, SPLIT_K, warps, stages)
    _shrink_config(*c)
    for c in [(16, 128, 4, 8, 3), (16, 256, 8, 8, 3), (16, 128, 2, 8, 4), (32, 128, 2, 4, 3), (32, 64, 1, 4, 4),
              (64, 64, 1, 4, 4), (64, 128, 2, 8, 3), (128, 64, 1, 8, 3)]
]  # fmt: skip
EXPAND_CONFIGS = [  # (BM, BN, warps)
    _expand_config(*c)
    for c in [(16, 64, 8), (16, 32, 4), (16, 256, 8), (32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8)]
]
# Split-K candidates add into ``down``, so every timed candidate starts from zeros.
_SHRINK_KEY = ["S_BUCKET", "T_BUCKET", "IN", "R_PAD"]
_SHRINK = triton.autotune(SHRINK_CONFIGS, key=_SHRINK_KEY, reset_to_zero=["down_ptr"])(_shrink_kernel)
_EXPAND = triton.autotune(EXPAND_CONFIGS, key=["S_BUCKET", "T_BUCKET", "OUT", "R_PAD"])(_expand_kernel)


def multi_lora_triton(x, A, B, scales, ids, shrink_config=None, expand_config=None) -> Tensor:
    """The two-kernel forward (arguments checked); banks of any strides; the configs pin tiles (tests)."""
    _, r, d_in = A.shape
    d_out = B.shape[1]
    x2 = x.reshape(-1, d_in)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    ids, scales = ids.contiguous(), scales.contiguous()  # the kernels index both with stride 1
    t, g = x2.shape[0], ids.shape[0]
    r_pad = max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16
    if max(t * x2.stride(0), t * max(d_out, r_pad), A.numel(), B.numel()) > MAX_INDEX:
        raise ValueError(
            f"{_OP}: x {tuple(x.shape)} or a bank spans more than {MAX_INDEX} elements; the kernels index with int32"
        )
    y = x2.new_empty((t, d_out))
    if t == 0:
        return y.reshape(*x.shape[:-1], d_out)
    s = t // g
    down = torch.zeros((t, r_pad), dtype=torch.float32, device=x.device)
    common = dict(R_PAD=r_pad, DOT_PRECISION=dot_precision(), UPCAST_DOT=interpreting())
    buckets = (triton.next_power_of_2(s), triton.next_power_of_2(t))
    launch(
        _SHRINK,
        lambda meta: (g * triton.cdiv(s, meta["BM"]), meta["SPLIT_K"]),
        x2, A, ids, down, s, d_in, r, x2.stride(0), *A.stride(), *buckets,
        **common, config=shrink_config,
    )  # fmt: skip
    launch(
        _EXPAND,
        lambda meta: (g * triton.cdiv(s, meta["BM"]), triton.cdiv(d_out, meta["BN"])),
        down, B, scales, ids, y, s, d_out, r, *B.stride(), y.stride(0), *buckets,
        **common, config=expand_config,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], d_out)


@torch.library.custom_op(_OP, mutates_args=())
def multi_lora(x: Tensor, A: Tensor, B: Tensor, scales: Tensor, ids: Tensor) -> Tensor:
    """``scales[k] · (x · A[k]ᵀ) · B[k]ᵀ`` per group of rows, k = ids[group]; the torch reference off CUDA."""
    check_multi_lora_args(x, A, B, scales, ids)
    return multi_lora_reference(x, A, B, scales, ids, distinct_ids(ids, A.shape[0]))


@multi_lora.register_kernel("cuda")
def multi_lora_cuda(x, A, B, scales, ids):
    check_multi_lora_args(x, A, B, scales, ids)
    check_adapter_ids(ids, A.shape[0])
    return multi_lora_triton(x, A, B, scales, ids)


@multi_lora.register_fake
def _(x, A, B, scales, ids):
    check_multi_lora_args(x, A, B, scales, ids)
    return x.new_empty((*x.shape[:-1], B.shape[1]))


def _setup_context(ctx, inputs, output):
    x, A, B, scales, ids = inputs
    frozen = [name for name, t in {"A": A, "B": B, "scales": scales}.items() if t.requires_grad]
    if frozen:
        raise ValueError(
            f"{_OP}: {', '.join(frozen)} requires grad, but adapter banks are frozen (the op differentiates x only); "
            "train a single adapter with lorafx::lora_linear instead"
        )
    ctx.save_for_backward(A, B, scales, ids)


def _backward(ctx, dy):
    A, B, scales, ids = ctx.saved_tensors
    # The transposed bank is a bank too: dx = scales[k] · (dy · B[k]) · A[k].
    dx = torch.ops.lorafx.multi_lora(dy, B.transpose(1, 2), A.transpose(1, 2), scales, ids)
    return dx, None, None, None, None


multi_lora.register_autograd(_backward, setup_context=_setup_context)
