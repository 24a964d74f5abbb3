"""Is lorafx's NF4 dequantize on CPU at least as fast as bitsandbytes', and how far from a copy?

Question: for a weight of Llama-7B size (4096x4096, blocksize 64, double quantization), does
the CPU path of ``lorafx::nf4_dequant`` (``dequantize_nf4_cpu``) match or beat bitsandbytes'
CPU ``dequantize_4bit`` (its C kernel), for float32 and bfloat16 output, with the same bits?
Providers, in one process, on the same quantized weight, called in turn round after round
(interleaved, so load on a shared machine hits them alike):

- lorafx: ``torch.ops.lorafx.nf4_dequant`` (absmax decode included, as for bnb);
- lorafx 4K pages: the same without the huge-page output allocation (what the formulation
  alone gives);
- lorafx reference: ``dequantize_nf4``, the plain-PyTorch ground truth (the CPU path before);
- bitsandbytes: ``bitsandbytes.functional.dequantize_4bit`` (absmax decode included);
- copy: ``clone()`` of an output-sized tensor: a fresh allocation written once, the floor.

Times are medians over rounds (spread: min-max). GB/s counts the bytes each provider must
move: the packed weight and its scales read, the output written (copy: output read and
written). "x bnb" is bitsandbytes' median over the provider's (above 1 = faster). "bits = bnb"
compares each lorafx output with bitsandbytes' bit for bit.

    python bench/bench_nf4_dequant_cpu.py                       # 4096x4096, 15 rounds
    python bench/bench_nf4_dequant_cpu.py --small               # 1024x1024, a quick check
    python bench/bench_nf4_dequant_cpu.py --out table.md        # also write the table

Benchmarks are not tests: nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import os
import statistics
import time

import torch

from lorafx.formats.nf4 import quantize_nf4
from lorafx.kernels import nf4 as K

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lorafx_4k_pages(args):
    """The op with huge-page allocation switched off for this call (the threshold out of reach)."""
    saved, K._HUGE_PAGE_BYTES = K._HUGE_PAGE_BYTES, float("inf")
    try:
        return torch.ops.lorafx.nf4_dequant(*args)
    finally:
        K._HUGE_PAGE_BYTES = saved


def providers(w: torch.Tensor, dtype: torch.dtype) -> tuple[dict, int, int]:
    """name -> zero-argument callable giving the dequantized weight, plus (bytes read, bytes written)."""
    import bitsandbytes.functional as F

    q = quantize_nf4(w, blocksize=64, double_quant=True)
    args = (q.packed, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, q.offset, 64, list(w.shape), dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    state = copy.copy(state)
    state.dtype = dtype  # bnb dequantizes to the quant state's dtype
    source = torch.ones(w.numel(), dtype=dtype)
    read = q.packed.numel() + q.absmax.numel() + 4 * q.nested_absmax.numel()
    written = w.numel() * source.element_size()
    return {
        "lorafx": lambda: torch.ops.lorafx.nf4_dequant(*args),
        "lorafx 4K pages": lambda: lorafx_4k_pages(args),
        "lorafx reference": lambda: K.dequantize_nf4(*args),
        "bitsandbytes": lambda: F.dequantize_4bit(packed, state),
        "copy": source.clone,
    }, read, written


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def measure(shape, dtype, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(shape)
    calls, read, written = providers(w, dtype)
    oracle = bits(calls["bitsandbytes"]())
    same = {name: torch.equal(bits(calls[name]()), oracle) for name in calls if name.startswith("lorafx")}
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["bitsandbytes"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        moved = 2 * written if name == "copy" else read + written
        rows.append(dict(
            shape=f"{shape[0]}x{shape[1]}", dtype=str(dtype).removeprefix("torch."), provider=name, ms=med * 1e3,
            lo=min(ts) * 1e3, hi=max(ts) * 1e3, gbs=moved / med / 1e9, x_bnb=base / med,
            same={True: "yes", False: "NO"}.get(same.get(name), "n/a"),
        ))  # fmt: skip
    return rows


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| shape | dtype | provider | median ms | spread ms | GB/s | x bnb | bits = bnb |",
             "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['ms']:.1f} | {r['lo']:.0f}-{r['hi']:.0f} "
            f"| {r['gbs']:.2f} | {r['x_bnb']:.2f} | {r['same']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="1024x1024, for a quick check")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (one call per provider each)")
    parser.add_argument("--dtype", choices=list(DTYPES), action="append", help="output dtype(s); default both")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()
    shape = (1024, 1024) if args.small else (4096, 4096)
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.dtype or list(DTYPES):
        rows += measure(shape, DTYPES[name], args.rounds)
    header = (
        f"NF4 dequantize on CPU, blocksize 64, double quant, {datetime.date.today()}: {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), bitsandbytes "
        f"{importlib.metadata.version('bitsandbytes')}; median of {args.rounds} interleaved rounds; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    text = table(rows, header)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
