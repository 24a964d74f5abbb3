"""Question: how much training memory does computing the loss a chunk of tokens at a time save at a large vocabulary?

Providers, each in its own fresh process: PEFT (the model's own loss on full float32 logits),
lorafx with LoraSpec(chunked_loss=False) (the same loss outside the graph), and lorafx's
default, the output head + cross-entropy run chunk by chunk (kernels/linear_cross_entropy.py).
The model is narrow and shallow so the logits dominate and the step runs on a small CPU:
Llama hidden 256, 1 layer, vocab 128256 (Llama 3's), batch 1 x seq 2048, r=16, all-linear.
The issue's target: peak ≤ 0.5x PEFT's.

Peak memory is measured as in bench_checkpointing.py (training_step.measure_steps): the
process's peak RSS during the timed steps (VmHWM after /proc/self/clear_refs) minus the RSS
before them, children under MALLOC_MMAP_THRESHOLD_=65536 so RSS follows the live tensors.
Times are printed but noisy on a shared machine.

    python bench/bench_loss_memory.py [--rounds 1] [--steps 1] [--vocab 128256] [--seq 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from training_step import measure_steps

PROVIDERS = ["peft", "lorafx-unfused", "lorafx"]


def build_model(args):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def wrap(provider: str, model, r: int):
    if provider.startswith("lorafx"):
        import lorafx

        spec = lorafx.LoraSpec(r=r, alpha=2 * r, chunked_loss=provider == "lorafx")
        lm = lorafx.transform(model, spec)
        return lm, lm.trainable_parameters()
    import peft

    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    return pm, [p for p in pm.parameters() if p.requires_grad]


def measure(provider: str, args) -> dict:
    model, params = wrap(provider, build_model(args), args.r)
    return measure_steps(model, params, args.vocab, args.batch, args.seq, args.steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    results = {p: [] for p in PROVIDERS}
    for _ in range(args.rounds):  # interleaved: each round runs every provider once
        for provider in PROVIDERS:
            cmd = [sys.executable, __file__, "--child", provider, *(
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "rounds"))]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[provider].append(json.loads(out.strip().splitlines()[-1]))
    med = {p: {k: statistics.median(x[k] for x in runs) for k in ("step_s", "peak_mib")} for p, runs in results.items()}
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"## Loss memory at a large vocabulary, eager training step, CPU ({torch.get_num_threads()} threads)")
    print(f"Llama hidden {args.hidden}, {args.layers} layer(s), vocab {args.vocab}, batch {args.batch} x seq {args.seq} "
          f"(float32 logits: {logits_mib:.0f} MiB), r={args.r}, all-linear; median of {args.rounds} fresh processes "
          f"x {args.steps} step(s)\n")
    print("| provider | peak memory during step (MiB) | vs PEFT | step time (s) | vs PEFT |")
    print("|---|---|---|---|---|")
    for p, m in med.items():
        print(f"| {p} | {m['peak_mib']:.0f} | {m['peak_mib'] / med['peft']['peak_mib']:.2f}x "
              f"| {m['step_s']:.2f} | {m['step_s'] / med['peft']['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
