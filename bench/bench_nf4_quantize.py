"""How fast do lorafx, bitsandbytes and torchao quantize weights to NF4 and back?

Question: is lorafx's vectorized plain-PyTorch NF4 (the CPU path and GPU reference) fast
enough next to bitsandbytes, whose bytes it reproduces, and torchao's NF4Tensor?
All providers use blocksize 64 with double quantization (256-element scale blocks) on the
same weights in the same run. Throughput is counted in weight elements; "x bnb" is
bitsandbytes' time divided by the provider's (above 1 = faster). "bytes = bnb" says whether
the packed codes, absmax codes, nested scales and offset equal bitsandbytes'.

    python bench/bench_nf4_quantize.py            # CPU, or CUDA when available
    python bench/bench_nf4_quantize.py --small    # quick check

Providers that are not installed are left out. Benchmarks are not tests: nothing asserts.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import time

import torch

from lorafx.formats.nf4 import quantize_nf4

SHAPES = [(4096, 4096), (4096, 11008)]
DTYPES = [torch.float32, torch.bfloat16]


def lorafx_provider():
    def quantize(w):
        return quantize_nf4(w, blocksize=64, double_quant=True)

    def dequantize(q):
        return q.dequantize()

    def state(q):
        return q.packed, q.absmax, q.nested_absmax, q.offset

    return quantize, dequantize, state


def bitsandbytes_provider():
    import bitsandbytes.functional as F

    def quantize(w):
        return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequantize(q):
        return F.dequantize_4bit(*q)

    def state(q):
        packed, s = q
        return packed, s.absmax, s.state2.absmax, s.offset

    return quantize, dequantize, state


def torchao_provider():
    from torchao.quantization import to_nf4

    def quantize(w):
        return to_nf4(w, block_size=64, scaler_block_size=256)

    def dequantize(q):
        return q.get_original_weight()

    return quantize, dequantize, None


PROVIDERS = {"lorafx": lorafx_provider, "bitsandbytes": bitsandbytes_provider, "torchao": torchao_provider}


def timed(fn, arg, repeats: int) -> tuple[float, object]:
    """Best wall time of ``fn(arg)`` over ``repeats`` calls after one warm-up, and its result.

    The minimum, not the median: on a small shared CPU box, other processes only ever add
    time (a stalled OpenMP thread can double a run), so the fastest run is the cleanest.
    """
    result = fn(arg)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(arg)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="one 1024x1024 weight, for a quick check")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(1024, 1024)] if args.small else SHAPES
    providers = {name: make() for name, make in PROVIDERS.items() if importlib.util.find_spec(name)}
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in providers)
    print(
        f"NF4 quantize + dequantize, blocksize 64, double quant; {device_name}; torch {torch.__version__}; {versions}\n"
    )
    print(
        "| shape | dtype | provider | quantize ms | Melem/s | x bnb | dequantize ms | Melem/s | x bnb | bytes = bnb |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for shape in shapes:
        for dtype in DTYPES:
            torch.manual_seed(0)
            w = torch.randn(shape, device=device).to(dtype)
            numel = w.numel()
            results = {}
            for name, (quantize, dequantize, state) in providers.items():
                tq, q = timed(quantize, w, args.repeats)
                td, _ = timed(dequantize, q, args.repeats)
                results[name] = (tq, td, state(q) if state else None)
            base = results.get("bitsandbytes")
            for name, (tq, td, st) in results.items():
                same = "n/a"
                if base and st and name != "bitsandbytes":
                    same = "yes" if all(torch.equal(a, b) for a, b in zip(st, base[2], strict=True)) else "NO"
                ratio_q = f"{base[0] / tq:.2f}" if base else "n/a"
                ratio_d = f"{base[1] / td:.2f}" if base else "n/a"
                print(
                    f"| {shape[0]}x{shape[1]} | {str(dtype).removeprefix('torch.')} | {name} "
                    f"| {tq * 1e3:.0f} | {numel / tq / 1e6:.0f} | {ratio_q} "
                    f"| {td * 1e3:.0f} | {numel / td / 1e6:.0f} | {ratio_d} | {same} |"
                )


if __name__ == "__main__":
    main()
