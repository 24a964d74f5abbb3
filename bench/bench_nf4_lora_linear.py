"""How fast is lorafx's fused NF4 + LoRA linear next to PEFT on bitsandbytes, torchao and 16-bit LoRA?

Question: on Llama-7B/8B layer shapes, does ``lorafx::nf4_lora_linear`` (NF4 decoded inside
the matmul, LoRA in the epilogue, split-K GEMV for decoding) beat the usual QLoRA stack,
and how close does it get to 16-bit LoRA and to a plain bf16 matmul? Providers, in one run
on the same weights (r = 16, scale 2, bfloat16):

- lorafx NF4: ``lorafx::nf4_lora_linear`` (the Triton kernels on CUDA, the reference on CPU);
- lorafx 16-bit: ``lorafx::lora_linear`` on the bf16 weight;
- PEFT + bitsandbytes: a PEFT LoRA layer around ``bnb.nn.Linear4bit`` (nf4, double quant);
- torchao NF4: ``F.linear`` on torchao's ``to_nf4`` weight (its linear_nf4) plus the LoRA branch;
- 16-bit LoRA: ``F.linear`` on the bf16 weight plus the LoRA branch in PyTorch;
- bf16 dense: ``F.linear`` alone (no LoRA): the floor.

Per (shape, tokens M) the forward is timed, and for M >= 4096 also forward + backward
(gradients of x, A and B; the base weight is frozen). GB/s and TFLOP/s count the useful
work, the same for every provider: the weight read once per pass in its own format (NF4
with its scales, or bf16), x, y (and dy, dx) once; 2·M·N·K (+ LoRA) flops per product. A
provider that dequantizes to a bf16 copy moves more bytes than it gets credit for; that is
the point. "x 16-bit" is the 16-bit LoRA time divided by the provider's (above 1 = faster).
Peak memory is the CUDA allocator's high-water mark during one call, weights included.

    python bench/bench_nf4_lora_linear.py                # CUDA, Llama shapes
    python bench/bench_nf4_lora_linear.py --small        # small shapes: a CPU smoke check
    python bench/bench_nf4_lora_linear.py --json r.json  # also write the rows as JSON
    python bench/bench_nf4_lora_linear.py --resources    # per-config registers/spills/shared memory
                                                         # on sm_80 and sm_90, compiled without a GPU

Providers that are not installed are listed as such. PEFT's layer times its own LoRA
parameters (copies of ours). Benchmarks are not tests: nothing asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import time

import torch
import torch.nn.functional as F

from lorafx.kernels import lora_matmul, nf4
from lorafx.kernels.lora_linear import lora_linear
from lorafx.kernels.nf4_lora_linear import nf4_lora_linear
from lorafx.formats.nf4 import quantize_nf4

SHAPES = {"4096->4096": (4096, 4096), "4096->11008": (4096, 11008), "14336->4096": (14336, 4096)}
TOKENS = [1, 16, 4096, 16384]
SMALL_SHAPES = {"256->512": (256, 512)}
SMALL_TOKENS = [1, 16, 64]
TRAIN_MIN_TOKENS = 4096  # decode-sized inputs are inference: forward only
SMALL_TRAIN_MIN_TOKENS = 64
RANK, SCALE = 16, 2.0

# Dense bfloat16 tensor-core TFLOP/s and memory TB/s from NVIDIA's datasheets, matched in
# order against torch.cuda.get_device_name().
PEAKS = [
    (("H200",), 989e12, 4.8e12),
    (("H100", "PCIe"), 756e12, 2.0e12),
    (("H100", "NVL"), 835e12, 3.9e12),
    (("H100",), 989e12, 3.35e12),
    (("A100", "80GB"), 312e12, 2.039e12),
    (("A100",), 312e12, 1.555e12),
    (("L40S",), 362e12, 0.864e12),
    (("L4",), 121e12, 0.3e12),
]


class Unavailable(Exception):
    """A provider that cannot run here (not installed, or no kernel for this device)."""


@dataclasses.dataclass
class Layer:
    """One layer's weights, shared by every provider."""

    w: torch.Tensor  # (N, K) bfloat16
    a: torch.Tensor  # (r, K)
    b: torch.Tensor  # (N, r)
    q: object  # lorafx NF4Weight of w

    @property
    def nf4_args(self):
        q = self.q
        tensors = (q.packed, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, q.offset)
        return (*tensors, q.blocksize, list(q.shape))


def lorafx_nf4(layer: Layer):
    args = layer.nf4_args
    return lambda x, a, b: nf4_lora_linear(x, *args, a, b, SCALE, None, None), layer.q.nbytes()


def lorafx_16bit(layer: Layer):
    return lambda x, a, b: lora_linear(x, layer.w, a, b, SCALE, None, None), layer.w.nbytes


def peft_bitsandbytes(layer: Layer):
    if not (importlib.util.find_spec("bitsandbytes") and importlib.util.find_spec("peft")):
        raise Unavailable("not installed")
    import bitsandbytes as bnb
    import peft

    n, k = layer.w.shape
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(layer.w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    base = base.to(layer.w.device)  # quantizes
    config = peft.LoraConfig(r=RANK, lora_alpha=RANK * SCALE, target_modules=["0"], lora_dropout=0.0)
    model = peft.get_peft_model(torch.nn.Sequential(base), config, autocast_adapter_dtype=False)
    lora = model.base_model.model[0]
    # PEFT owns its LoRA parameters: give them our bf16 factors (it would keep float32 ones).
    lora.lora_A["default"].weight.data = layer.a.clone()
    lora.lora_B["default"].weight.data = layer.b.clone()
    tensors = (base.weight, *_bnb_state_tensors(base.weight.quant_state))
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return lambda x, a, b: model(x), weight_bytes


def _bnb_state_tensors(state):
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
    return tensors


def torchao_nf4(layer: Layer):
    if not importlib.util.find_spec("torchao"):
        raise Unavailable("not installed")
    from torchao.quantization import to_nf4

    weight = to_nf4(layer.w, block_size=64, scaler_block_size=256)  # F.linear dispatches to linear_nf4
    parts = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
    weight_bytes = sum(getattr(weight, p).numel() * getattr(weight, p).element_size() for p in parts)
    return lambda x, a, b: F.linear(x, weight) + F.linear(F.linear(x, a), b) * SCALE, weight_bytes


def lora_16bit(layer: Layer):
    return lambda x, a, b: F.linear(x, layer.w) + F.linear(F.linear(x, a), b) * SCALE, layer.w.nbytes


def dense_bf16(layer: Layer):
    return lambda x, a, b: F.linear(x, layer.w), layer.w.nbytes


PROVIDERS = {
    "lorafx NF4": lorafx_nf4,
    "lorafx 16-bit": lorafx_16bit,
    "PEFT + bitsandbytes": peft_bitsandbytes,
    "torchao NF4": torchao_nf4,
    "16-bit LoRA": lora_16bit,
    "bf16 dense": dense_bf16,
}
BASELINE = "16-bit LoRA"


def timed(fn, grads, device: str) -> float:
    """Seconds per call: triton's do_bench (median) on CUDA; best of 5 after a warm-up on CPU
    (a smoke check there: a shared CPU makes single calls vary by 10x or more)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=grads) * 1e-3
    fn()
    times = []
    for _ in range(5):
        for t in grads:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def work(m: int, k: int, n: int, weight_bytes: int, lora: bool, train: bool) -> tuple[float, float]:
    """(flops, bytes) of useful work; see the module docstring."""
    base_flops = 2 * m * n * k * (2 if train else 1)  # forward (+ dx; the base weight is frozen)
    lora_flops = 2 * m * RANK * (k + n) * (3 if train else 1) if lora else 0  # (+ dx, dA, dB)
    activations = 2 * (m * k + m * n) * (2 if train else 1)  # bf16 x, y (+ dy, dx)
    return base_flops + lora_flops, weight_bytes * (2 if train else 1) + activations


def peak_for(device: str) -> tuple[float, float] | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next(((flops, bw) for parts, flops, bw in PEAKS if all(p in name for p in parts)), None)


def run(shapes, tokens, train_min: int, device: str) -> list[dict]:
    peak = peak_for(device)
    rows = []
    for shape_name, (k, n) in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(n, k, device=device, generator=g) / k**0.5).bfloat16()
        a = (torch.randn(RANK, k, device=device, generator=g) / k**0.5).bfloat16()
        b = (torch.randn(n, RANK, device=device, generator=g) / RANK**0.5).bfloat16()
        layer = Layer(w, a, b, quantize_nf4(w))
        providers = {}
        for name, make in PROVIDERS.items():
            try:
                providers[name] = make(layer)
            except Unavailable as e:
                print(f"{name}: unavailable ({e})")
            except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. no 4-bit kernel for this device
                print(f"{name}: unavailable on {device} ({type(e).__name__}: {str(e).splitlines()[0]})")
        print(f"\n{HEADER}\n{HEADER_RULE}")
        for m in tokens:
            for train in (False, True) if m >= train_min else (False,):
                x = torch.randn(m, k, device=device, generator=g).bfloat16()
                dy = torch.randn(m, n, device=device, generator=g).bfloat16()
                results = {}
                for name, (fn, weight_bytes) in providers.items():
                    results[name] = measure(fn, x, a, b, dy, train, device) + (weight_bytes,)
                base_time = results.get(BASELINE, (None,))[0]
                for name, (seconds, peak_bytes, weight_bytes) in results.items():
                    flops, nbytes = work(m, k, n, weight_bytes, name != "bf16 dense", train)
                    row = dict(shape=shape_name, tokens=m, mode="fwd+bwd" if train else "fwd", provider=name,
                               ms=seconds * 1e3, gbps=nbytes / seconds / 1e9, tflops=flops / seconds / 1e12,
                               peak_mb=peak_bytes / 2**20 if peak_bytes is not None else None,
                               vs_16bit=base_time / seconds if base_time else None)  # fmt: skip
                    if peak:
                        row.update(pct_flops=100 * flops / seconds / peak[0], pct_bw=100 * nbytes / seconds / peak[1])
                    rows.append(row)
                    print_row(row)
    return rows


def measure(fn, x, a, b, dy, train: bool, device: str) -> tuple[float, int | None]:
    """(seconds per call, peak allocated bytes during one call or None off CUDA)."""
    if train:
        x, a, b = (t.detach().requires_grad_() for t in (x, a, b))

        def step():
            fn(x, a, b).backward(dy)

        grads = [x, a, b]
    else:

        def step():
            with torch.no_grad():
                fn(x, a, b)

        grads = []
    seconds = timed(step, grads, device)
    if device != "cuda":
        return seconds, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return seconds, torch.cuda.max_memory_allocated()


HEADER = "| shape | M | pass | provider | ms | GB/s | % BW | TFLOP/s | % FLOP/s | peak MB | x 16-bit |"
HEADER_RULE = "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"


def print_row(row: dict) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(
        f"| {row['shape']} | {row['tokens']} | {row['mode']} | {row['provider']} | {row['ms']:.3f} "
        f"| {row['gbps']:.3g} | {fmt(row.get('pct_bw'), '.0f')} | {row['tflops']:.3g} "
        f"| {fmt(row.get('pct_flops'), '.0f')} | {fmt(row['peak_mb'], '.0f')} | {fmt(row['vs_16bit'], '.2f')} |"
    )


def describe(config) -> str:
    tiles = " ".join(f"{name}={value}" for name, value in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}"


def print_tuned_configs() -> None:
    """The config autotuning chose per key, for each kernel list: the measurements the config comments owe."""
    kernels = {f"matmul {shape}/{weight}": kernel for (shape, weight), kernel in lora_matmul._KERNELS.items()}
    kernels["nf4_dequant"] = nf4._nf4_dequant
    print("\nAutotuned configs (key: M bucket, C, J, TRANSPOSE_W, HAS_LORA, DOUBLE_QUANT, dtypes...):")
    for name, kernel in kernels.items():
        for key, config in kernel.cache.items():
            print(f"  {name} {key}: {describe(config)}")


def print_resources() -> None:
    """Registers, spill bytes and shared memory of every config, compiled for sm_80 and sm_90."""
    print("| kernel | config | input grad | sm_80 regs/stack B/smem KiB | sm_90 regs/stack B/smem KiB |")
    print("|---|---|---|---|---|")
    for (shape, weight), configs in lora_matmul._CONFIGS.items():
        for config in configs:
            for transpose_w in (False, True) if shape == "gemm" else (False,):
                usage = [lora_matmul.resource_usage(shape, weight, config, transpose_w=transpose_w, arch=arch)
                         for arch in (80, 90)]  # fmt: skip
                cells = " | ".join(f"{u.registers}/{u.stack}/{u.shared / 1024:.0f}" for u in usage)
                print(f"| {shape} {weight} | {describe(config)} | {transpose_w} | {cells} |")
    for config in nf4._nf4_dequant.configs:
        usage = [nf4.dequant_resource_usage(config, arch) for arch in (80, 90)]
        cells = " | ".join(f"{u.registers}/{u.stack}/{u.shared / 1024:.0f}" for u in usage)
        print(f"| nf4_dequant | {describe(config)} | - | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="one small shape and M up to 64: a quick check")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--resources", action="store_true", help="print per-config GPU resources (no GPU needed)")
    args = parser.parse_args()
    if args.resources:
        print_resources()
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("torch", "triton", "bitsandbytes", "peft", "torchao")
        if importlib.util.find_spec(name)
    )
    peak = peak_for(device)
    peaks = f"; peak {peak[0] / 1e12:.0f} TFLOP/s, {peak[1] / 1e12:.2f} TB/s" if peak else ""
    print(f"NF4 + LoRA linear, r={RANK}, bfloat16; {device_name}{peaks}; {versions}\n")
    shapes, tokens = (SMALL_SHAPES, SMALL_TOKENS) if args.small else (SHAPES, TOKENS)
    rows = run(shapes, tokens, SMALL_TRAIN_MIN_TOKENS if args.small else TRAIN_MIN_TOKENS, device)
    if device == "cuda":
        print_tuned_configs()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "versions": versions, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
