"""Question: does streaming a checkpoint straight to NF4 keep peak memory near the NF4 model size?

Providers, each in a fresh process on the same sharded fp32 checkpoint (Llama, hidden 1024,
8 layers, vocab 32000, ~166M params, saved once in a temp folder):
- lorafx streaming: `lorafx.from_pretrained(dir, LoraSpec(quantize="nf4"))`
- lorafx after full load: transformers `from_pretrained` in fp32, then `lorafx.transform(quantize="nf4")`
- transformers + bitsandbytes: `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit))`
  (where bitsandbytes and accelerate install)
Peak = the process's peak RSS (VmHWM) minus its RSS after imports. Target for streaming:
peak ≤ 1.3 × (NF4 model size) + the largest single tensor.

    python bench/bench_load_nf4.py [--layers 8] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

PROVIDERS = ("lorafx streaming", "lorafx after full load", "transformers+bitsandbytes")


def child(provider: str, folder: str) -> dict:
    import torch
    import transformers

    import lorafx
    from lorafx.runtime.memory import status_kib

    base = status_kib("VmRSS")
    spec = lorafx.LoraSpec(r=16, alpha=32, quantize="nf4")
    start = time.perf_counter()
    if provider == "lorafx streaming":
        model = lorafx.from_pretrained(folder, spec, progress=False)
    elif provider == "lorafx after full load":
        model = lorafx.transform(transformers.AutoModelForCausalLM.from_pretrained(folder), spec)
    else:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=config)
    seconds = time.perf_counter() - start
    tensors = list(model.parameters()) + list(model.buffers())
    size = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    return {"peak_mib": (status_kib("VmHWM") - base) / 1024, "model_mib": size / 2**20, "seconds": seconds}


def save_checkpoint(folder, layers, hidden):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size="100MB")
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return sum(p.numel() for p in model.parameters()), largest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import importlib.util

    with tempfile.TemporaryDirectory() as folder:
        params, largest = save_checkpoint(folder, args.layers, args.hidden)
        rows = {}
        for provider in PROVIDERS:
            if provider.startswith("transformers") and not all(
                importlib.util.find_spec(m) for m in ("bitsandbytes", "accelerate")
            ):
                continue
            out = subprocess.run([sys.executable, __file__, "--child", provider, folder],
                                 check=True, capture_output=True, text=True).stdout
            rows[provider] = json.loads(out.strip().splitlines()[-1])
    nf4_mib = rows["lorafx streaming"]["model_mib"]
    target = 1.3 * nf4_mib + largest / 2**20
    print(f"## Loading a checkpoint to NF4: peak memory, CPU ({platform.machine()}), {datetime.date.today()}")
    print(f"Llama {params / 1e6:.0f}M params, fp32 safetensors in 100 MB shards ({params * 4 / 2**20:.0f} MiB); "
          f"largest tensor {largest / 2**20:.0f} MiB; NF4 model (LoRA r=16 included) {nf4_mib:.0f} MiB; "
          f"streaming target ≤ 1.3 × NF4 + largest = {target:.0f} MiB\n")
    print("| provider | peak RSS growth (MiB) | vs lorafx streaming | loaded model (MiB) | time (s) |")
    print("|---|---|---|---|---|")
    for provider, r in rows.items():
        ratio = r["peak_mib"] / rows["lorafx streaming"]["peak_mib"]
        print(f"| {provider} | {r['peak_mib']:.0f} | {ratio:.2f}x | {r['model_mib']:.0f} | {r['seconds']:.1f} |")
    verdict = "meets" if rows["lorafx streaming"]["peak_mib"] <= target else "MISSES"
    print(f"\nlorafx streaming {verdict} the target ({rows['lorafx streaming']['peak_mib']:.0f} vs {target:.0f} MiB).")


if __name__ == "__main__":
    main()
