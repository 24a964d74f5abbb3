"""Question: where does a lorafx training step stand against PEFT on this CPU, eager and compiled,
LoRA and QLoRA, in time, memory and compile time?

One run, every provider in its own fresh process (so peak memory is its own), providers
interleaved round by round; medians over rounds with the spread (min-max). Same Llama from a
config, same inputs (input_ids + attention_mask + labels), same AdamW (training_step.py).

Providers:
- peft, peft+compile (`torch.compile(model)`: Inductor), lorafx, lorafx+compile
  (`torch.compile(lm, backend="lorafx")`)
- peft+bnb: transformers + bitsandbytes `load_in_4bit` (nf4, double quant, fp32 compute) + PEFT;
  lorafx-nf4, lorafx-nf4+compile: `LoraSpec(quantize="nf4")`

Three cases:
- steps: every provider on the main model (hidden 512, 4 layers, vocab 32000 by default);
  "first" is the first step (compile included), "step" the median of the timed steps.
- memory: peft and lorafx at vocab 128256, seq 2048 (hidden 256, 1 layer): the logits' share.
- depth: compile time (first step minus a step) of lorafx+compile and peft+compile at 2 and 16 layers.

    python bench/bench_train_cpu.py [--rounds 2] [--steps 3] [--plot bench/train_cpu.png]
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
import tempfile

import torch

from training_step import measure_steps

PROVIDERS = ["peft", "peft+compile", "lorafx", "lorafx+compile", "peft+bnb", "lorafx-nf4", "lorafx-nf4+compile"]
PEER = {"lorafx": "peft", "lorafx+compile": "peft+compile", "lorafx-nf4": "peft+bnb", "lorafx-nf4+compile": "peft+bnb"}


def build_model(hidden: int, layers: int, vocab: int, seq: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 16 * 16,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=seq,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def bnb_model(model):
    """The same weights through transformers' bitsandbytes loader (what a PEFT QLoRA user runs)."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        return transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=config)


def wrap(provider: str, model, r: int):
    if provider.startswith("lorafx"):
        import lorafx

        spec = lorafx.LoraSpec(r=r, alpha=2 * r, targets="all-linear", quantize="nf4" if "nf4" in provider else None)
        lm = lorafx.transform(model, spec)
        params = lm.trainable_parameters()
        return (torch.compile(lm, backend="lorafx") if provider.endswith("+compile") else lm), params
    import peft

    if provider == "peft+bnb":
        model = bnb_model(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    params = [p for p in pm.parameters() if p.requires_grad]
    return (torch.compile(pm) if provider.endswith("+compile") else pm), params


def child(args) -> dict:
    model, params = wrap(args.child, build_model(args.hidden, args.layers, args.vocab, args.seq), args.r)
    return measure_steps(model, params, args.vocab, args.batch, args.seq, args.steps)


def run(provider: str, args, **override) -> dict:
    settings = {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "seq", "batch", "steps", "r")} | override
    cmd = [sys.executable, os.path.abspath(__file__), "--child", provider]
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{provider} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str) -> str:
    mid = format(statistics.median(values), fmt)
    return mid if len(values) == 1 else f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def plot(path: str, med: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(med)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(names, [med[n]["step_s"] for n in names])
    left.set_xlabel("training step (s, median)")
    right.barh(names, [med[n]["peak_mib"] for n in names])
    right.set_xlabel("peak memory during steps (MiB)")
    right.set_yticklabels([])
    left.invert_yaxis()
    right.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--cases", nargs="+", default=["steps", "memory", "depth"], choices=["steps", "memory", "depth"])
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 16])
    parser.add_argument("--plot", help="write a PNG of step time and peak memory per provider here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"## Training step, CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"{datetime.date.today()}")
    if "steps" in args.cases:
        runs = {p: [] for p in args.providers}
        for _ in range(args.rounds):
            for provider in args.providers:
                runs[provider].append(run(provider, args))
        med = {p: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "peak_mib")} for p, rs in runs.items()}
        print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
              f"r={args.r} all-linear, fp32; {args.rounds} rounds of fresh processes x {args.steps} steps; "
              "median (min-max over rounds)\n")
        print("| provider | step (s) | first step (s) | peak memory (MiB) | step vs PEFT eager | step vs peer | memory vs peer |")
        print("|---|---|---|---|---|---|---|")
        for p, rs in runs.items():
            peer = PEER.get(p, p)
            vs_eager = ratio(med[p]["step_s"], med["peft"]["step_s"]) if "peft" in med else "-"
            vs_peer = (ratio(med[p]["step_s"], med[peer]["step_s"]), ratio(med[p]["peak_mib"], med[peer]["peak_mib"])) \
                if peer in med and peer != p else ("-", "-")
            print(f"| {p} | {spread([x['step_s'] for x in rs], '.3f')} | {spread([x['first_s'] for x in rs], '.1f')} "
                  f"| {spread([x['peak_mib'] for x in rs], '.0f')} | {vs_eager} | {vs_peer[0]} | {vs_peer[1]} |")
        print("\npeer: lorafx vs peft, lorafx+compile vs peft+compile, lorafx NF4 vs peft+bnb.")
        if args.plot:
            plot(args.plot, med)
            print(f"Plot: {os.path.basename(args.plot)}")
    if "memory" in args.cases:
        big = dict(hidden=256, layers=1, vocab=128256, seq=2048, batch=1, steps=1)
        mem = {p: run(p, args, **big) for p in ("peft", "lorafx")}
        print("\nBig vocabulary: hidden 256, 1 layer, vocab 128256, batch 1 x seq 2048 (one step after a warm-up)\n")
        print("| provider | step (s) | peak memory (MiB) | memory vs PEFT |")
        print("|---|---|---|---|")
        for p, m in mem.items():
            print(f"| {p} | {m['step_s']:.2f} | {m['peak_mib']:.0f} | {ratio(m['peak_mib'], mem['peft']['peak_mib'])} |")
    if "depth" in args.cases:
        shallow, deep = args.depths
        print(f"\nCompile time (first step minus a step) against depth, hidden {args.hidden}, one process each\n")
        print(f"| provider | {shallow} layers (s) | {deep} layers (s) | {deep} / {shallow} |")
        print("|---|---|---|---|")
        for p in ("lorafx+compile", "peft+compile"):
            took = [(m["first_s"] - m["step_s"]) for m in (run(p, args, layers=n, steps=1) for n in (shallow, deep))]
            print(f"| {p} | {took[0]:.0f} | {took[1]:.0f} | {ratio(took[1], took[0])} |")


if __name__ == "__main__":
    main()
