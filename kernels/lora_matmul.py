"""The Triton kernel family behind ``lorafx::lora_linear`` and ``lorafx::nf4_lora_linear``.

One kernel computes, for a 2-D input ``a`` (M, C),

    out = a · op(W) + scale · down · up (+ bias)        op(W) = Wᵀ (forward) or W (input gradient)

with W dense (bf16/fp16/fp32) or NF4. NF4 tiles are decoded in registers inside the main
loop (``nf4_decode_tile``), so the 16-bit W never exists in global memory. ``down`` is the
LoRA-down product (x·Aᵀ in the forward, dy·B in the backward), an (M, r) matrix computed
once before the launch: it is 2·M·K·r flops, r/N of the main product (0.4% at r=16,
N=4096), and computing it inside the kernel would repeat it for every column block. The
LoRA-up product and the bias are added in the epilogue, on the float32 accumulator, so
the LoRA branch costs no extra pass over the (M, N) output.

Two autotuned launch families share the kernel body:
- GEMM (M > 16): output tiles over (M, N), grouped ordering for L2 reuse.
- GEMV (M <= 16, decoding): one 16-row tile, K split over ``SPLIT_K`` programs whose
  partial sums meet in a float32 buffer through atomic adds, so every weight byte is read
  exactly once while enough programs run to fill the GPU.

The backward math shared by both ops (``lora_backward``) also lives here.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from .nf4 import nf4_decode_tile
from .triton_launch import (
    MAX_INDEX,
    Resources,
    candidate_configs,
    compiled_resources,
    dot_precision,
    interpreting,
    launch,
)

GEMV_MAX_M = 16
"""Inputs with at most this many rows (decode steps) take the split-K GEMV configs:
16 is the smallest M tile ``tl.dot`` accepts, so one row tile holds the whole input."""


@dataclasses.dataclass(frozen=True)
class NF4Operand:
    """The tensors of an NF4 weight as the kernel reads them (arguments of ``lorafx::nf4_dequant``)."""

    packed: Tensor
    absmax: Tensor
    quant_map: Tensor
    nested_absmax: Tensor | None
    nested_quant_map: Tensor | None
    offset: Tensor | None
    blocksize: int


@triton.jit
def _op_w_tile(
    w_ptr,
    absmax_ptr,
    quant_map_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    offset_ptr,
    c0,
    j0,
    C,
    J,
    stride_w,
    BK: tl.constexpr,
    BN: tl.constexpr,
    TRANSPOSE_W: tl.constexpr,
    W_NF4: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """The (BK, BN) tile ``op(W)[c0 : c0 + BK, j0 : j0 + BN]``, in float32 (NF4) or as stored (dense).

    NF4 must be decoded along W's rows (its byte order), then transposed in registers for
    the forward; dense W is simply read through transposed pointers. Entries outside W are
    not all zeroed: past C they meet zeros of ``a``, past J they are never stored.
    """
    rc = c0 + tl.arange(0, BK)
    rj = j0 + tl.arange(0, BN)
    if W_NF4:
        if TRANSPOSE_W:
            return nf4_decode_tile(
                w_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
                rc, j0, C, J, BN, BLOCKSIZE, DOUBLE_QUANT,
            )  # fmt: skip
        else:
            return tl.trans(
                nf4_decode_tile(
                    w_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
                    rj, c0, J, C, BK, BLOCKSIZE, DOUBLE_QUANT,
                )  # fmt: skip
            )
    else:
        inside = (rc[:, None] < C) & (rj[None, :] < J)
        if TRANSPOSE_W:
            offsets = rc[:, None] * stride_w + rj[None, :]
        else:
            offsets = rc[:, None] + rj[None, :] * stride_w
        return tl.load(w_ptr + offsets, mask=inside, other=0.0)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a·b``; float32 operands under the interpreter (see ``triton_launch``)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _lora_matmul_kernel(
    a_ptr,
    w_ptr,
    absmax_ptr,
    quant_map_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    offset_ptr,
    down_ptr,
    up_ptr,
    bias_ptr,
    out_ptr,
    M,
    C,
    J,
    R,
    stride_am,
    stride_w,
    stride_dm,
    stride_ur,
    stride_uj,
    stride_om,
    scale,
    M_BUCKET,  # only an autotuning key: one tuned config per power-of-two range of M
    TRANSPOSE_W: tl.constexpr,
    W_NF4: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out (M, J) = a (M, C) · op(W) + scale · down (M, R) · up (R, J) + bias (J).

    W is (J, C) and op(W) = Wᵀ when not TRANSPOSE_W (forward); W is (C, J) and op(W) = W
    when TRANSPOSE_W (input gradient). Program (pid, pid_k) computes one (BM, BN) output
    tile over the pid_k-th of SPLIT_K slices of C; the slice-0 program adds the epilogue.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BM)
    grid_j = tl.cdiv(J, BN)
    # Grouped ordering (Triton's matmul tutorial): GROUP_M row tiles sweep the same column
    # tiles together, so a W tile is still in L2 when the next row tile asks for it.
    per_group = GROUP_M * grid_j
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_j = (pid % per_group) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rj = pid_j * BN + tl.arange(0, BN)
    c_per_split = tl.cdiv(tl.cdiv(C, BK), SPLIT_K) * BK
    c_begin = pid_k * c_per_split
    c_end = tl.minimum(C, c_begin + c_per_split)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(c_begin, c_end, BK):
        rc = c0 + tl.arange(0, BK)
        a_mask = (rm[:, None] < M) & (rc[None, :] < c_end)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rc[None, :], mask=a_mask, other=0.0)
        w = _op_w_tile(
            w_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
            c0, pid_j * BN, C, J, stride_w, BK, BN, TRANSPOSE_W, W_NF4, BLOCKSIZE, DOUBLE_QUANT,
        )  # fmt: skip
        acc = _dot(a, w.to(a_ptr.dtype.element_ty), acc, DOT_PRECISION, UPCAST_DOT)

    if pid_k == 0:
        if HAS_LORA:
            rr = tl.arange(0, R_PAD)
            d_mask = (rm[:, None] < M) & (rr[None, :] < R)
            down = tl.load(down_ptr + rm[:, None] * stride_dm + rr[None, :], mask=d_mask, other=0.0)
            u_mask = (rr[:, None] < R) & (rj[None, :] < J)
            up = tl.load(up_ptr + rr[:, None] * stride_ur + rj[None, :] * stride_uj, mask=u_mask, other=0.0)
            # Scaling the (BM, r) tile, not the (BM, BN) product, lets the dot accumulate
            # straight into acc: a second (BM, BN) float32 tile spilled on sm_90.
            down = (down.to(tl.float32) * scale).to(a_ptr.dtype.element_ty)
            acc = _dot(down, up, acc, DOT_PRECISION, UPCAST_DOT)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rj, mask=rj < J, other=0.0).to(tl.float32)[None, :]

    out = out_ptr + rm[:, None] * stride_om + rj[None, :]
    out_mask = (rm[:, None] < M) & (rj[None, :] < J)
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out, acc, mask=out_mask)


def _config(bm, bn, bk, split_k, warps, stages, group_m=8):
    return triton.Config(
        {"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split_k, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# Candidate tile configs; autotuning picks per shape. GPU timings are owed (bench/gpu_check.sh
# prints the winner per shape). Measured without a GPU, by compiling every config for sm_80
# and sm_90 with the alignment hints a real launch gets (triton.compile to a GPUTarget; shared
# memory from its metadata, registers and stack from cuobjdump --dump-resource-usage; the
# table: `python bench/bench_nf4_lora_linear.py --resources`): all are software-pipelined
# (cp.async), none spills, and shared memory stays at most 110 KiB on sm_80 (A100 allows 163
# per block) and 144 KiB on sm_90 (H100 allows 227).
# Dense lists: Triton's matmul-tutorial float16 list (tuned there on A100/H100). NF4 lists
# use fewer stages because the pipeliner stages every gather of the decode in shared memory:
# NF4 128x128x32 takes 96 KiB at 3 stages, 136 at 4; GEMV 16x64x128 84 KiB at 2, 152 at 3;
# the dense list's 128x256x64 would take 336 KiB as NF4 (over H100's 227) and spill.
# GEMV: N/BN · SPLIT_K programs should cover the SMs (132 on H100) a few times over for
# N = 4096 (64 · 4 = 256 for the first NF4 config). Each list's first config is the one
# the interpreter tests run; the GEMV ones split K so that the atomic path is tested.
_CONFIGS = {
    ("gemm", "dense"): [
        _config(128, 256, 64, 1, 8, 3),
        _config(64, 256, 32, 1, 4, 4),
        _config(128, 128, 32, 1, 4, 4),
        _config(128, 64, 32, 1, 4, 4),
        _config(64, 128, 32, 1, 4, 4),
        _config(32, 64, 32, 1, 2, 5),
    ],
    ("gemm", "nf4"): [
        _config(128, 128, 32, 1, 8, 3),
        _config(128, 128, 64, 1, 8, 2),
        _config(128, 64, 32, 1, 4, 3),
        _config(64, 128, 32, 1, 4, 3),
        _config(64, 64, 64, 1, 4, 2),
        _config(32, 64, 32, 1, 2, 5),
    ],
    ("gemv", "dense"): [
        _config(16, 64, 128, 4, 4, 3, group_m=1),
        _config(16, 32, 128, 8, 4, 3, group_m=1),
        _config(16, 128, 128, 2, 4, 3, group_m=1),
        _config(16, 64, 256, 2, 4, 3, group_m=1),
        _config(16, 64, 64, 8, 2, 4, group_m=1),
    ],
    ("gemv", "nf4"): [
        _config(16, 64, 128, 4, 4, 2, group_m=1),
        _config(16, 32, 128, 8, 4, 2, group_m=1),
        _config(16, 128, 64, 2, 4, 2, group_m=1),
        _config(16, 64, 64, 4, 4, 3, group_m=1),
        _config(16, 64, 64, 8, 2, 4, group_m=1),
    ],
}
_KEY = ["M_BUCKET", "C", "J", "TRANSPOSE_W", "HAS_LORA", "DOUBLE_QUANT"]
# GEMV programs split K and accumulate with atomics, so every timed candidate starts from zeros.
_KERNELS = {
    (shape, weight): triton.autotune(
        configs=configs, key=_KEY, reset_to_zero=["out_ptr"] if shape == "gemv" else None
    )(_lora_matmul_kernel)
    for (shape, weight), configs in _CONFIGS.items()
}


def lora_matmul(
    a: Tensor,
    weight: Tensor | NF4Operand,
    *,
    transpose_w: bool,
    out_features: int,
    down: Tensor | None,
    up: Tensor | None,
    scale: float,
    bias: Tensor | None,
    config: triton.Config | None = None,
) -> Tensor:
    """``a · op(W) + scale · down · up (+ bias)`` for a 2-D ``a``; arguments already checked.

    ``weight`` is a dense (J, C) / (C, J) matrix or an NF4 weight of that shape with an
    even row length; ``up`` an (r, J) matrix, any strides (Bᵀ is a view). ``config`` pins
    one tile config instead of autotuning (tests use it). When the chosen configs may split
    K, partial sums accumulate in float32 and are cast to ``a``'s dtype at the end.
    """
    m, c = a.shape
    j = out_features
    if a.stride(1) != 1:
        a = a.contiguous()
    if max(m * a.stride(0), m * j, c * j) > MAX_INDEX:
        raise ValueError(
            f"input ({m}, {c}) with {j} outputs spans more than {MAX_INDEX} elements; the kernels index with int32"
        )
    nf4 = isinstance(weight, NF4Operand)
    kernel = _KERNELS["gemv" if m <= GEMV_MAX_M else "gemm", "nf4" if nf4 else "dense"]
    split = any(cfg.kwargs["SPLIT_K"] > 1 for cfg in candidate_configs(kernel, config))
    out = torch.zeros((m, j), dtype=torch.float32, device=a.device) if split else a.new_empty((m, j))
    if m == 0:
        return out.to(a.dtype)
    if nf4:
        w_args = (weight.packed, weight.absmax, weight.quant_map, weight.nested_absmax)
        w_args += (weight.nested_quant_map, weight.offset)
        stride_w, blocksize, double_quant = 0, weight.blocksize, weight.absmax.dtype == torch.uint8
    else:
        weight = weight if weight.stride(1) == 1 else weight.contiguous()
        w_args = (weight, None, None, None, None, None)
        stride_w, blocksize, double_quant = weight.stride(0), 0, False
    r = up.shape[0] if up is not None else 0
    launch(
        kernel,
        lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(j, meta["BN"]), meta["SPLIT_K"]),
        a,
        *w_args,
        down,
        up,
        bias,
        out,
        m,
        c,
        j,
        r,
        a.stride(0),
        stride_w,
        down.stride(0) if down is not None else 0,
        up.stride(0) if up is not None else 0,
        up.stride(1) if up is not None else 0,
        out.stride(0),
        float(scale),
        triton.next_power_of_2(m),
        TRANSPOSE_W=transpose_w,
        W_NF4=nf4,
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double_quant,
        HAS_LORA=up is not None,
        HAS_BIAS=bias is not None,
        # tl.dot needs every dimension >= 16; padded ranks are masked to zero.
        R_PAD=max(16, triton.next_power_of_2(r)),
        DOT_PRECISION=dot_precision(),
        UPCAST_DOT=interpreting(),
        # Decoded NF4 values must round like the reference's (no fused multiply-add).
        enable_fp_fusion=False,
        config=config,
    )
    return out.to(a.dtype) if split else out



def resource_usage(
    shape: str, weight: str, config: triton.Config, *, transpose_w: bool = False, arch: int = 90
) -> Resources:
    """Registers, spills and shared memory of one config of the ``(shape, weight)`` list on sm_<arch>.

    Compiles the heaviest variant (bfloat16, double-quantized NF4 with blocksize 64 or
    dense W, LoRA rank 16 and bias) without a GPU; the numbers behind the config lists.
    """
    nf4 = weight == "nf4"
    signature = {
        **dict.fromkeys(("a_ptr", "down_ptr", "up_ptr", "bias_ptr"), "*bf16"),
        "w_ptr": "*u8" if nf4 else "*bf16",
        "out_ptr": "*fp32" if shape == "gemv" else "*bf16",
        **dict.fromkeys(("M", "C", "J", "R", "stride_am", "stride_w", "stride_dm", "stride_ur"), "i32"),
        **dict.fromkeys(("stride_uj", "stride_om", "M_BUCKET"), "i32"),
        "scale": "fp32",
    }
    nf4_pointers = ("absmax_ptr", "quant_map_ptr", "nested_absmax_ptr", "nested_quant_map_ptr", "offset_ptr")
    if nf4:
        signature.update(dict.fromkeys(nf4_pointers, "*fp32"), absmax_ptr="*u8")
    constexprs = dict(TRANSPOSE_W=transpose_w, W_NF4=nf4, BLOCKSIZE=64 if nf4 else 0, DOUBLE_QUANT=nf4)
    constexprs.update(HAS_LORA=True, HAS_BIAS=True, R_PAD=16, DOT_PRECISION="ieee", UPCAST_DOT=False)
    if not nf4:
        constexprs.update(dict.fromkeys(nf4_pointers))
    return compiled_resources(_lora_matmul_kernel, signature, constexprs, config, arch)

# ---------------------------------------------------------------------------------------
# What both ops share around the kernel: argument checks and the backward math.

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_lora_args(
    op: str,
    x: Tensor,
    out_features: int,
    in_features: int,
    A: Tensor | None,
    B: Tensor | None,
    bias: Tensor | None,
    x_lora: Tensor | None,
) -> None:
    """Raise ValueError unless x, the LoRA factors, bias and x_lora fit a (out, in) linear layer.

    Shared by the ops' real and fake implementations, so a bad call fails at trace time
    with the shapes in the message, not inside a kernel.
    """
    if x.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{op}: x is {x.dtype}; allowed: {', '.join(map(str, COMPUTE_DTYPES))}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{op}: x has shape {tuple(x.shape)}; its last dimension must be in_features={in_features} "
            f"of the ({out_features}, {in_features}) weight"
        )
    if (A is None) != (B is None):
        raise ValueError(f"{op}: give both LoRA factors A and B or neither")
    if A is not None:
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or B.dim() != 2 or r < 1 or A.shape[1] != in_features or tuple(B.shape) != (out_features, r):
            raise ValueError(
                f"{op}: A has shape {tuple(A.shape)} and B {tuple(B.shape)}; expected A (r, {in_features}) "
                f"and B ({out_features}, r) with r >= 1"
            )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected ({out_features},)")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"{op}: x_lora has shape {tuple(x_lora.shape)}; expected x's shape {tuple(x.shape)}")
    for name, t in {"A": A, "B": B, "bias": bias, "x_lora": x_lora}.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but x is {x.dtype}; the op computes in one dtype")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def lora_backward(needs, dy, x, x_lora, A, B, scale, grad_input):
    """Gradients of ``y = base(x) + scale · (x_lora · Aᵀ) · Bᵀ`` for x, x_lora, A, B and bias.

    ``needs`` holds booleans (x, x_lora, A, B, bias); ``grad_input(dy, u)`` computes
    ``dy · W (+ scale · u · A)`` with the op's fused kernel, so W is never materialized.
    ``u = dy · B`` (M, r) is computed once and serves dx, dx_lora and dA; ``x_lora · Aᵀ``
    is recomputed for dB rather than saved (2·M·K·r flops, r/N of the forward, for one
    (M, r) activation less per layer). x_lora None means the LoRA branch reads x, so dx
    carries both terms; otherwise dx_lora gets the LoRA term and flows back to dropout.
    """
    need_x, need_x_lora, need_a, need_b, need_bias = needs
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    xl2 = x2 if x_lora is None else x_lora.reshape(x2.shape)
    lora_in_dx = need_x and x_lora is None
    u = dy2 @ B if A is not None and (lora_in_dx or need_x_lora or need_a) else None
    dx = dx_lora = da = db = dbias = None
    if need_x:
        dx = grad_input(dy2, u if lora_in_dx else None).reshape(x.shape)
    if need_x_lora:
        dx_lora = ((u @ A) * scale).reshape(x.shape)
    if need_a:
        da = (u.T @ xl2) * scale
    if need_b:
        db = (dy2.T @ (xl2 @ A.T)) * scale
    if need_bias:
        dbias = dy2.sum(0)
    return dx, dx_lora, da, db, dbias
