"""Question: is a lorafx training step at least as fast and as lean as PEFT's, in eager mode?

Same tiny-but-not-trivial Llama (hidden 512, 4 layers, seq 256, r=16, all-linear), same inputs
(input_ids + attention_mask + labels, as a tokenizer gives them), same AdamW. Each provider runs
in its own fresh process (so peak memory is its own), alternating lorafx/PEFT for several
rounds; the table gives medians and lorafx/PEFT ratios.

Peak memory is the process's peak RSS during the timed steps (VmHWM after resetting it with
/proc/self/clear_refs), minus the RSS before them: activations, gradients, optimizer state.

    python bench/bench_lora_train_cpu.py [--rounds 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys

import torch

from training_step import measure_steps


def build_model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def wrap(provider: str, model, r: int):
    if provider == "lorafx":
        import lorafx

        lm = lorafx.transform(model, lorafx.LoraSpec(r=r, alpha=2 * r, targets="all-linear"))
        return lm, lm.trainable_parameters()
    import peft

    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    return pm, [p for p in pm.parameters() if p.requires_grad]


def measure(provider: str, steps: int, batch: int, seq: int, r: int) -> dict:
    model, params = wrap(provider, build_model(), r)
    return measure_steps(model, params, 32000, batch, seq, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch, args.seq, args.r)))
        return
    results = {"lorafx": [], "peft": []}
    for _ in range(args.rounds):
        for provider in results:
            cmd = [sys.executable, __file__, "--child", provider, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[provider].append(json.loads(out.strip().splitlines()[-1]))
    med = {p: {k: statistics.median(x[k] for x in runs) for k in ("step_s", "peak_mib")} for p, runs in results.items()}
    print(f"## LoRA training step, eager, CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {datetime.date.today()}")
    print(f"Llama hidden 512, 4 layers, vocab 32000, batch {args.batch}, seq {args.seq}, r={args.r}, all-linear; "
          f"median of {args.rounds} fresh processes x {args.steps} steps each\n")
    print("| provider | step time (s) | peak memory during steps (MiB) | time vs PEFT | memory vs PEFT |")
    print("|---|---|---|---|---|")
    for p, m in med.items():
        print(f"| {p} | {m['step_s']:.3f} | {m['peak_mib']:.0f} | {m['step_s'] / med['peft']['step_s']:.2f}x "
              f"| {m['peak_mib'] / med['peft']['peak_mib']:.2f}x |")


if __name__ == "__main__":
    main()
