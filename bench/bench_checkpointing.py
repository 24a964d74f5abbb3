"""Question: how much training memory does per-layer activation checkpointing save, and at what cost in time?

Providers, each in its own fresh process (so peak memory is its own): lorafx with and without
the checkpoint_layers pass, the same for QLoRA (quantize="nf4"), and PEFT with and without
Hugging Face's gradient_checkpointing_enable() as the reference. Same tiny-but-not-trivial Llama
(hidden 512, 8 layers, vocab 8000, seq 512, batch 2, r=16, all-linear), same inputs, same AdamW.
The vocabulary is kept small so the logits (which no layer checkpointing can save) do not drown
the activations of the layers.

Peak memory is the process's peak RSS during the timed steps (VmHWM after resetting it with
/proc/self/clear_refs), minus the RSS before them: activations, gradients, optimizer state.
Children run with MALLOC_MMAP_THRESHOLD_=65536: glibc then maps every tensor of 64 KiB or more
on its own and unmaps it when freed, so RSS follows the live tensors. Without it glibc keeps
the warm-up step's freed memory in its heap, the timed steps reuse it, and the peak over the
RSS before them measures allocator history instead of the step.

    python bench/bench_checkpointing.py [--rounds 1] [--steps 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

from training_step import measure_steps

PROVIDERS = ["lorafx", "lorafx+ckpt", "lorafx-nf4", "lorafx-nf4+ckpt", "peft", "peft+ckpt"]
BASELINE = {"lorafx+ckpt": "lorafx", "lorafx-nf4+ckpt": "lorafx-nf4", "peft+ckpt": "peft"}


def build_model(layers: int, vocab: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def wrap(provider: str, model, r: int):
    if provider.startswith("lorafx"):
        import lorafx
        from lorafx.passes.checkpoint_layers import checkpoint_layers

        spec = lorafx.LoraSpec(r=r, alpha=2 * r, targets="all-linear", quantize="nf4" if "nf4" in provider else None)
        lm = lorafx.transform(model, spec)
        if provider.endswith("+ckpt"):
            checkpoint_layers(lm.graph_module, None)
        return lm, lm.trainable_parameters()
    import peft

    if provider.endswith("+ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    return pm, [p for p in pm.parameters() if p.requires_grad]


def measure(provider: str, args) -> dict:
    model, params = wrap(provider, build_model(args.layers, args.vocab), args.r)
    return measure_steps(model, params, args.vocab, args.batch, args.seq, args.steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    results = {p: [] for p in PROVIDERS}
    for _ in range(args.rounds):
        for provider in PROVIDERS:
            cmd = [sys.executable, __file__, "--child", provider, *(
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "rounds"))]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[provider].append(json.loads(out.strip().splitlines()[-1]))
    med = {p: {k: statistics.median(x[k] for x in runs) for k in ("step_s", "peak_mib")} for p, runs in results.items()}
    print(f"## Activation checkpointing, eager training step, CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {datetime.date.today()}")
    print(f"Llama hidden 512, {args.layers} layers, vocab {args.vocab}, batch {args.batch}, seq {args.seq}, "
          f"r={args.r}, all-linear; median of {args.rounds} fresh processes x {args.steps} steps each\n")
    print("| provider | step time (s) | peak memory during steps (MiB) | memory vs no checkpointing "
          "| time vs no checkpointing |")
    print("|---|---|---|---|---|")
    for p, m in med.items():
        base = med[BASELINE.get(p, p)]
        print(f"| {p} | {m['step_s']:.3f} | {m['peak_mib']:.0f} | {m['peak_mib'] / base['peak_mib']:.2f}x "
              f"| {m['step_s'] / base['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
