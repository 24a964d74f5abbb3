"""NF4 (4-bit NormalFloat) with double quantization, bit-compatible with bitsandbytes.

This file is the plain-PyTorch reference: the ground truth that kernel tests compare
against (and the op's path on devices without a kernel of their own). Every rounding step mirrors
bitsandbytes 0.50 on CPU so that packed bytes, absmax codes and dequantized values are
identical to what ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4",
compress_statistics=True)`` produces; checkpoints therefore move freely between the two.

Layout (bitsandbytes' own):
- blocks of ``blocksize`` run over the flattened row-major weight;
- two 4-bit codes per byte, element 2i in the high nibble;
- per-block absmax either as float32, or (double quantization) as uint8 codes of
  ``absmax - offset`` in the signed 8-bit dynamic map, with one float32 scale per
  ``NESTED_BLOCKSIZE`` codes (``nested_absmax``) and ``offset = absmax.mean()``.

All functions are vectorized over blocks; nothing loops in Python per block.

On CPU the op runs ``dequantize_nf4_cpu``: the same bits as the reference, formulated for
speed (chunked, threaded, huge-page output; see its docstring and bench/bench_nf4_dequant_cpu.py).
On CUDA the op runs a Triton kernel instead (``nf4_dequant_triton``), built on
``nf4_decode_tile``, the device function the fused matmul kernels
(``lorafx.kernels.lora_matmul``) decode weight tiles with.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import threading
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_launch import MAX_INDEX, Resources, compiled_resources, launch

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
"""The 16 NF4 values (quantiles of N(0, 1) scaled to [-1, 1]), exactly as bitsandbytes stores them."""

# bitsandbytes quantizes by bucketizing against float32 midpoints; bucketize(right=False)
# sends a value equal to a midpoint to the lower code, as bitsandbytes does.
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

NESTED_BLOCKSIZE = 256
"""Blocksize of the second-level quantization of absmax (fixed at 256 by bitsandbytes)."""

_LOOKUP_SIZE = 65536


def dynamic_map_signed_8bit() -> Tensor:
    """The 256-entry signed 8-bit dynamic map used to double-quantize absmax.

    Reimplements ``bitsandbytes.functional.create_dynamic_map(signed=True,
    max_exponent_bits=7, total_bits=8)`` step for step (same float32 linspace, midpoint
    and scaling operations), because the double-quantized codes are only portable if the
    map is bit-identical. Exponent i contributes 2**i fraction values at scale 10**(i-6),
    with both signs; 0 and 1.0 complete the 256 entries (the map is asymmetric: its most
    negative value is -0.99297, not -1).
    """
    parts = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        parts += [(10 ** (i - 6)) * means, (-(10 ** (i - 6))) * means]
    parts.append(torch.tensor([0.0, 1.0]))
    return torch.cat(parts).sort().values


DYNAMIC_MAP = dynamic_map_signed_8bit()


def _dynamic_lookup(code: Tensor) -> Tensor:
    """The 65536-entry table bitsandbytes' CPU kernel uses instead of a nearest search.

    bitsandbytes maps a normalized value s in [-1, 1] to ``i = trunc((s + 1) * 0.5 * 65535
    + 0.5)`` and reads the code from this table, whose entry i is the number of float32
    midpoints of ``code`` below ``-1 + 2i / 65535``. Reproducing the table (rather than
    rounding to the nearest code) is what makes our absmax codes match bitsandbytes' CPU
    output bit for bit.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LOOKUP_SIZE, dtype=torch.float32)) / (_LOOKUP_SIZE - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


_DYNAMIC_LOOKUP = _dynamic_lookup(DYNAMIC_MAP)


def quantize_nf4_blocks(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Quantize ``w`` to NF4 codes, blocks running over the flattened row-major weight.

    Returns ``(packed, absmax)``: packed uint8 of shape ``(numel // 2, 1)`` and float32
    absmax of shape ``(numel // blocksize,)``. The caller guarantees a finite floating
    ``w`` whose numel is a multiple of ``blocksize`` (``lorafx.quantize_nf4`` checks).
    The scale is ``x * (1 / absmax)``, not ``x / absmax``: bitsandbytes multiplies by the
    reciprocal, and the two can differ in the last bit, moving a value across a midpoint. An
    all-zero block gets absmax 0 and code 7 (the NF4 zero) everywhere, i.e. bytes 0x77.
    """
    blocks = w.detach().reshape(-1, blocksize).float().contiguous()
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    codes = torch.bucketize(scaled, _NF4_MIDPOINTS.to(w.device), out_int32=True).to(torch.uint8)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return packed.reshape(-1, 1), absmax


def double_quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Compress float32 absmax to uint8 codes, as bitsandbytes' ``compress_statistics``.

    Returns ``(codes, nested_absmax, offset)``: codes uint8 like ``absmax``, one float32
    scale per ``NESTED_BLOCKSIZE`` codes (the last group may be partial), and the 0-d
    float32 ``offset = absmax.mean()``. Subtracting the mean centres the (all positive)
    absmax values so the signed map spends its precision on their spread. Rounding goes
    through bitsandbytes' 65536-entry lookup (see ``_dynamic_lookup``); a group whose
    scale is 0 gets code 0, as in bitsandbytes.
    """
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    groups = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centered, (0, groups * NESTED_BLOCKSIZE - n)).view(groups, NESTED_BLOCKSIZE)
    nested_absmax = padded.abs().amax(dim=1)
    nonzero = (nested_absmax != 0).unsqueeze(1)
    inverse = 1.0 / torch.where(nonzero, nested_absmax.unsqueeze(1), 1.0)
    scaled = (padded * inverse).clamp_(-1, 1)
    lookup_index = ((scaled + 1.0) * 0.5 * (_LOOKUP_SIZE - 1) + 0.5).to(torch.int64)
    codes = torch.where(nonzero, _DYNAMIC_LOOKUP.to(absmax.device)[lookup_index], 0)
    return codes.to(torch.uint8).reshape(-1)[:n], nested_absmax, offset


def dequantize_absmax(codes: Tensor, nested_absmax: Tensor, nested_quant_map: Tensor, offset: Tensor) -> Tensor:
    """Invert ``double_quantize_absmax``: ``nested_quant_map[code] * nested_absmax + offset`` in float32."""
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
    return nested_quant_map[codes.long()] * scale + offset


def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> Tensor:
    """Reference dequantization: float32 ``quant_map[nibble] * absmax[block]``, then ``.to(dtype)``.

    ``absmax`` is float32, or uint8 codes (double quantization) together with
    ``nested_absmax``, ``nested_quant_map`` and ``offset``. Rounding to ``dtype`` happens
    once at the end, as in bitsandbytes, so bf16/fp16 results match it bit for bit.
    """
    if absmax.dtype == torch.uint8:
        absmax = dequantize_absmax(absmax, nested_absmax, nested_quant_map, offset)
    # Row b of byte_values holds the two values byte b decodes to, high nibble first,
    # so one gather per byte replaces separate shift/mask/gather passes.
    byte_values = torch.stack((quant_map.repeat_interleave(16), quant_map.repeat(16)), dim=1)
    values = torch.index_select(byte_values, 0, packed.reshape(-1).int()).view(-1, blocksize)
    return values.mul_(absmax.unsqueeze(1)).reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------
# CPU: the reference's arithmetic, laid out for speed. Each step was measured on 4096x4096 on
# the 2-core CI machine under load (bench/bench_nf4_dequant_cpu.py; numbers in the README).

_SERIAL = 32768
"""The most elements an ATen op still runs on the calling thread (its GRAIN_SIZE). Every op here
stays at or below it: on the loaded 2-core machine an op split over OpenMP threads stalls
whenever the other thread is descheduled, and chunks of 64K-256K bytes (each op a parallel
region) took 5-10x longer than these. Parallelism comes from Python threads instead."""

_CHUNK_BYTES = _SERIAL
"""Packed bytes per chunk: one serial int32 conversion and one serial index_select each; its
65536 values are multiplied in two serial pieces. 32K-byte chunks cut the Python-side launches
per byte by half against 16K ones (~10% of the time), and keep the chunk's buffers in L2."""

_MIN_CHUNKS_PER_THREAD = 8  # below this a thread's start (~0.1 ms) costs more than it saves

_HUGE_PAGE_BYTES = 32 << 20
"""Outputs from this size get transparent huge pages. glibc always mmaps allocations over 32 MiB
afresh, so each call pays one page fault per 4 KiB on first touch; with 2 MiB pages a fresh
64 MiB tensor was ~3.5x faster to fill. Smaller allocations come from glibc's heap, mostly
already faulted in, and an madvise there would split the heap's mapping."""

_MADV_HUGEPAGE = 14
_madvise = None
if sys.platform == "linux":
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _empty_output(numel: int, dtype: torch.dtype) -> Tensor:
    """``torch.empty(numel, dtype)``, asking the kernel for huge pages when it is large.

    MADV_HUGEPAGE is only a hint on pages not touched yet (torch.empty touches none): it changes
    how the memory is backed, not what it holds or when it is freed.
    """
    out = torch.empty(numel, dtype=dtype)
    nbytes = numel * out.element_size()
    if _madvise is not None and nbytes >= _HUGE_PAGE_BYTES:
        start = (out.data_ptr() + 4095) & ~4095
        _madvise(start, (out.data_ptr() + nbytes - start) & ~4095, _MADV_HUGEPAGE)  # failure: 4 KiB pages
    return out


def _dequantize_absmax_cpu(codes: Tensor, nested_absmax: Tensor, nested_quant_map: Tensor, offset: Tensor) -> Tensor:
    """``dequantize_absmax`` with the same two roundings (product, then + offset), without the
    int64 codes and the repeat_interleave'd scale: one gather, then a broadcast multiply per 256."""
    out = torch.index_select(nested_quant_map, 0, codes.reshape(-1).int())
    full = out.numel() // NESTED_BLOCKSIZE * NESTED_BLOCKSIZE
    out[:full].view(-1, NESTED_BLOCKSIZE).mul_(nested_absmax[: full // NESTED_BLOCKSIZE, None])
    out[full:].mul_(nested_absmax[-1])
    return out.add_(offset)


def dequantize_nf4_cpu(
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> Tensor:
    """``dequantize_nf4`` bit for bit, several times faster on CPU (arguments already checked).

    The same float32 products ``quant_map[nibble] * absmax[block]``, rounded once to ``dtype``;
    only the layout of the work differs:
    - a 256-entry table gives each packed byte its two float32 values as one int64, so one
      ``index_select`` per byte writes both, straight into the float32 output (no int64 codes,
      no shift/mask passes, no (256, 2) row gathers, which were 1.6x slower);
    - the work runs in chunks of ``_CHUNK_BYTES`` through small reused buffers, each op on
      one thread (``_SERIAL``), with ``torch.get_num_threads()`` Python threads taking chunks as they come
      (ATen releases the GIL inside ops; a descheduled thread only delays its own chunk);
    - 16-bit outputs are staged per chunk in float32 and copied out (torch.mul with a bf16 out=
      was slower than mul_ + copy_);
    - a large output is allocated with huge pages (``_empty_output``).
    Nothing is cached between calls: the output is the only full-size tensor.
    """
    if absmax.dtype == torch.uint8:
        absmax = _dequantize_absmax_cpu(absmax, nested_absmax, nested_quant_map, offset)
    # Row b: the two values byte b decodes to, high nibble first (as dequantize_nf4's byte_values).
    pairs = torch.stack((quant_map.repeat_interleave(16), quant_map.repeat(16)), dim=1).view(torch.int64).reshape(256)
    packed = packed.reshape(-1)
    nbytes = packed.numel()
    out = _empty_output(2 * nbytes, dtype)
    chunk = min(_CHUNK_BYTES, nbytes)  # a multiple of blocksize // 2 (both powers of two), or all
    piece_rows = _SERIAL // blocksize
    per_chunk = -(-(2 * chunk // blocksize) // piece_rows)  # pieces of piece_rows blocks per chunk, rounded up
    # Every chunk's and piece's view made up front (one call each): the loop only launches ops.
    sources = packed.split(chunk)
    scales = absmax.reshape(-1, 1).split(piece_rows)
    targets = out.view(-1, blocksize).split(piece_rows)
    pair_targets = out.view(torch.int64).split(chunk) if dtype == torch.float32 else None
    next_chunk = itertools.count()  # shared by the threads; next() is atomic under the GIL

    def work():
        index = torch.empty(chunk, dtype=torch.int32)
        if pair_targets is None:  # 16-bit (or other) output: float32 values staged per chunk
            staging = torch.empty(chunk, dtype=torch.int64)
            staged = staging.view(torch.float32).view(-1, blocksize).split(piece_rows)
        # In-place ops on `out` (an inference tensor under inference mode) must run in inference
        # mode; it also skips autograd bookkeeping in threads that do not inherit the caller's.
        with torch.inference_mode():
            for c in next_chunk:
                if c >= len(sources):
                    return
                source = sources[c]
                i = index if source.numel() == chunk else index[: source.numel()]
                i.copy_(source)
                pieces = slice(c * per_chunk, (c + 1) * per_chunk)
                if pair_targets is not None:
                    torch.index_select(pairs, 0, i, out=pair_targets[c])
                    torch._foreach_mul_(targets[pieces], scales[pieces])  # one launch, each piece serial
                else:
                    torch.index_select(pairs, 0, i, out=staging[: source.numel()])
                    values = [v[: t.shape[0]] for v, t in zip(staged, targets[pieces])]  # the last chunk is short
                    torch._foreach_mul_(values, scales[pieces])
                    torch._foreach_copy_(targets[pieces], values)

    errors: list[BaseException] = []

    def helper():
        try:
            work()
        except BaseException as error:  # re-raised in the caller's thread below
            errors.append(error)

    threads = [threading.Thread(target=helper, daemon=True) for _ in range(_thread_count(len(sources)) - 1)]
    for thread in threads:
        thread.start()
    try:
        work()
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return out.view(shape)


def _thread_count(chunks: int) -> int:
    """Threads for ``chunks`` chunks: torch's intra-op thread count, fewer for small weights."""
    return max(1, min(torch.get_num_threads(), chunks // _MIN_CHUNKS_PER_THREAD))


def check_blocksize(blocksize: int) -> None:
    """Raise ValueError unless ``blocksize`` is one bitsandbytes supports for 4-bit (32..4096, a power of two)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"blocksize={blocksize!r} is invalid; allowed: a power of two in 32..4096")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize={blocksize} is invalid; allowed: a power of two in 32..4096")


def check_nf4_args(
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    shape: Sequence[int],
) -> None:
    """Raise ValueError unless the NF4 tensors and metadata describe one consistent weight.

    Shared by the op's real and fake implementations (so a bad call fails at trace time,
    not inside a kernel) and by ``lorafx.NF4Weight``. Messages name the field, the
    value and what was expected.
    """
    check_blocksize(blocksize)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape={list(shape)} is invalid; dimensions must be non-negative")
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0 or numel % blocksize:
        raise ValueError(
            f"shape={list(shape)} has {numel} elements; allowed: a positive multiple of blocksize={blocksize}"
        )
    if packed.dtype != torch.uint8 or packed.numel() != numel // 2:
        raise ValueError(
            f"packed is {packed.dtype} with {packed.numel()} elements; expected torch.uint8 with "
            f"{numel // 2} (two 4-bit codes per byte for shape={list(shape)})"
        )
    blocks = numel // blocksize
    if absmax.dtype not in (torch.uint8, torch.float32) or absmax.numel() != blocks:
        raise ValueError(
            f"absmax is {absmax.dtype} with {absmax.numel()} elements; expected torch.uint8 (double "
            f"quantization) or torch.float32 with {blocks} (numel {numel} / blocksize {blocksize})"
        )
    if quant_map.dtype != torch.float32 or quant_map.numel() != 16:
        raise ValueError(
            f"quant_map is {quant_map.dtype} with {quant_map.numel()} elements; expected torch.float32 with 16"
        )
    nested = {"nested_absmax": nested_absmax, "nested_quant_map": nested_quant_map, "offset": offset}
    if absmax.dtype == torch.float32:
        given = [name for name, t in nested.items() if t is not None]
        if given:
            raise ValueError(f"absmax is float32 (no double quantization) but {', '.join(given)} given; expected None")
        return
    missing = [name for name, t in nested.items() if t is None]
    if missing:
        raise ValueError(f"absmax is uint8 (double quantization) but {', '.join(missing)} missing")
    groups = -(-blocks // NESTED_BLOCKSIZE)
    expected = {"nested_absmax": groups, "nested_quant_map": 256, "offset": 1}
    for name, t in nested.items():
        if t.dtype != torch.float32 or t.numel() != expected[name]:
            raise ValueError(
                f"{name} is {t.dtype} with {t.numel()} elements; expected torch.float32 with {expected[name]}"
            )


@torch.library.custom_op("lorafx::nf4_dequant", mutates_args=())
def nf4_dequant(
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> Tensor:
    """Dequantize a bitsandbytes-layout NF4 weight to ``shape`` and ``dtype``.

    One opaque node in FX / export / Inductor graphs, so fusion passes can match it and
    exported programs keep the 4-bit storage. The arguments mirror the bitsandbytes
    checkpoint tensors (``offset`` is a 0-d float32 tensor, the JSON's nested_offset);
    the maps are passed as data, not baked in, because checkpoints carry their own.
    The result is a frozen weight: no autograd formula is registered, so gradients flow
    to whatever consumes the output (e.g. the input of a linear) but never to storage.
    """
    check_nf4_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape)
    args = (packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dtype)
    return _observed(dequantize_nf4(*args), args)


@nf4_dequant.register_kernel("cpu")
def _(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dtype):
    check_nf4_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape)
    args = (packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dtype)
    return _observed(dequantize_nf4_cpu(*args), args)


# Callbacks told of every eager dequantization, (result, op arguments): lorafx.nf4_memory uses
# them to let autograd keep the NF4 weight instead of its dequantized copy.
DEQUANT_OBSERVERS: list = []


def _observed(out: Tensor, args) -> Tensor:
    for observer in DEQUANT_OBSERVERS:
        observer(out, args)
    return out


@nf4_dequant.register_fake
def _(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dtype):
    check_nf4_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape)
    return packed.new_empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Triton: the decode shared by the dequant kernel and the fused matmuls, and the dequant op on CUDA.

_NESTED_BLOCKSIZE = tl.constexpr(NESTED_BLOCKSIZE)  # jit functions read only constexpr globals


@triton.jit
def nf4_decode_tile(
    packed_ptr,
    absmax_ptr,
    quant_map_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    offset_ptr,
    rows,
    col0,
    n_rows,
    n_cols,
    WIDTH: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """``W[rows, col0 : col0 + WIDTH]`` of an NF4 weight W of shape (n_rows, n_cols), in float32.

    W is read as bitsandbytes lays it out: flat row-major, two codes per byte (element 2i
    in the high nibble), one scale per BLOCKSIZE flat elements. Loading a (rows, WIDTH/2)
    tile of bytes and interleaving its two nibbles reads every byte once; it needs an even
    ``col0`` and ``n_cols`` so that a byte never straddles two rows (the ops check n_cols).
    Both nibbles of a byte share one scale (BLOCKSIZE is even), so scales are read per
    byte. Elements outside W are not zeroed: callers mask them through the other operand
    or the store. The arithmetic is the reference's, op for op (launch with
    ``enable_fp_fusion=False`` for bit-identical results).
    """
    byte_cols = col0 // 2 + tl.arange(0, WIDTH // 2)
    flat = rows[:, None] * n_cols + 2 * byte_cols[None, :]  # flat index of each byte's high nibble
    inside = (rows[:, None] < n_rows) & (2 * byte_cols[None, :] < n_cols)
    byte = tl.load(packed_ptr + flat // 2, mask=inside, other=0).to(tl.int32)
    high = tl.load(quant_map_ptr + (byte >> 4))
    low = tl.load(quant_map_ptr + (byte & 15))
    block = flat // BLOCKSIZE
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // _NESTED_BLOCKSIZE, mask=inside, other=0.0)
        scale = tl.load(nested_quant_map_ptr + code) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
    return tl.interleave(high * scale, low * scale)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,
    absmax_ptr,
    quant_map_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    offset_ptr,
    out_ptr,
    numel,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    WIDTH: tl.constexpr,
):
    """One pass over memory: each program decodes WIDTH flat elements (the weight as one row)."""
    col0 = tl.program_id(0) * WIDTH
    values = nf4_decode_tile(
        packed_ptr,
        absmax_ptr,
        quant_map_ptr,
        nested_absmax_ptr,
        nested_quant_map_ptr,
        offset_ptr,
        tl.zeros((1,), dtype=tl.int32),
        col0,
        1,
        numel,
        WIDTH,
        BLOCKSIZE,
        DOUBLE_QUANT,
    )
    cols = col0 + tl.arange(0, WIDTH)[None, :]
    tl.store(out_ptr + cols, values.to(out_ptr.dtype.element_ty), mask=cols < numel)


# Candidates: the kernel streams 0.5 B in and 2 B out per element, so WIDTH only has to give
# each program enough bytes in flight; autotuning picks per weight size, GPU timings are owed
# (bench/gpu_check.sh). Measured by compiling for sm_80/sm_90 (bench/bench_nf4_lora_linear.py
# --resources): 30-38 registers, no spills, at most 8 KiB of shared memory for all three.
_nf4_dequant = triton.autotune(
    configs=[
        triton.Config({"WIDTH": 1024}, num_warps=4),
        triton.Config({"WIDTH": 2048}, num_warps=4),
        triton.Config({"WIDTH": 4096}, num_warps=8),
    ],
    key=["numel", "BLOCKSIZE", "DOUBLE_QUANT"],
)(_nf4_dequant_kernel)


def dequant_resource_usage(config: triton.Config, arch: int = 90) -> Resources:
    """Registers, spills and shared memory of one dequant config on sm_<arch> (bfloat16 out, double quant)."""
    signature = dict.fromkeys(("quant_map_ptr", "nested_absmax_ptr", "nested_quant_map_ptr", "offset_ptr"), "*fp32")
    signature.update(packed_ptr="*u8", absmax_ptr="*u8", out_ptr="*bf16", numel="i32")
    return compiled_resources(_nf4_dequant_kernel, signature, dict(BLOCKSIZE=64, DOUBLE_QUANT=True), config, arch)


def nf4_dequant_triton(
    packed: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    config: triton.Config | None = None,
) -> Tensor:
    """The Triton dequantization (arguments already checked): bit-identical to ``dequantize_nf4``
    on a GPU (Triton's CPU interpreter truncates float32 -> bfloat16 where GPUs round).

    ``config`` pins one tile config instead of autotuning (tests use it).
    """
    numel = packed.numel() * 2
    if numel > MAX_INDEX:
        raise ValueError(f"shape={list(shape)} has {numel} elements; the Triton kernel supports at most {MAX_INDEX}")
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    double_quant = absmax.dtype == torch.uint8
    launch(
        _nf4_dequant,
        lambda meta: (triton.cdiv(numel, meta["WIDTH"]),),
        packed,
        absmax,
        quant_map,
        nested_absmax,
        nested_quant_map,
        offset,
        out,
        numel,
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double_quant,
        enable_fp_fusion=False,
        config=config,
    )
    return out


@nf4_dequant.register_kernel("cuda")
def _(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape, dtype):
    check_nf4_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, blocksize, shape)
    nf4_args = (packed, absmax, quant_map, nested_absmax, nested_quant_map, offset)
    return _observed(nf4_dequant_triton(*nf4_args, blocksize, shape, dtype), (*nf4_args, blocksize, shape, dtype))
