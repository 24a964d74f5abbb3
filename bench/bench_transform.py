"""How long does lorafx.transform take beside peft.get_peft_model, and does it grow with depth?

Question (issue 21 part 5): the cost of turning a Llama (hidden 256, intermediate 512,
4 heads / 2 KV heads, vocab 1000) into a LoRA model (r=8, all linear layers but the head) at
2, 8 and 32 layers. Every measurement is a fresh Python process (imports done, model built
before the clock starts), providers interleaved round by round: "first" is the first call
in the process (what a training script pays, torch.export's one-time set-up included),
"second" a second call on another instance of the same architecture in that process (lorafx
reuses its captured graph: graph_cache), "new" a third call, on a model of another
architecture (intermediate 768) in the now warm process: a capture without the cache.
Printed: medians (min–max) in seconds, and lorafx / PEFT ratios of the medians.

    python bench/bench_transform.py                 # 3 rounds, 2/8/32 layers
    python bench/bench_transform.py --rounds 5 --layers 2 32
    python bench/bench_transform.py --baseline-python ../main/.venv/bin/python  # + another checkout's lorafx

Benchmarks are not tests: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

PROVIDERS = ("lorafx", "peft")


def config(layers: int, intermediate: int = 512):
    import transformers

    return transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)


def one_process(provider: str, layers: int) -> dict:
    """Seconds of the first and of a second transform in this (fresh) process."""
    import transformers

    def model():
        return transformers.AutoModelForCausalLM.from_config(config(layers))

    if provider == "lorafx":
        import lorafx

        spec = lorafx.LoraSpec(r=8, alpha=16)

        def run(m):
            return lorafx.transform(m, spec)
    else:
        import peft

        def run(m):
            return peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

    seconds = []
    for _ in range(2):
        m = model()
        start = time.perf_counter()
        run(m)
        seconds.append(time.perf_counter() - start)
    other = transformers.AutoModelForCausalLM.from_config(config(layers, intermediate=768))
    start = time.perf_counter()
    run(other)  # warm process, an architecture not seen yet: lorafx captures it afresh
    return {"first": seconds[0], "second": seconds[1], "new": time.perf_counter() - start}


def summary(values):
    return f"{statistics.median(values):.3f} ({min(values):.2f}–{max(values):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--baseline-python", help="also time lorafx as installed for this interpreter "
                        "(another checkout's venv: the before of a change), as provider 'lorafx-baseline'")
    parser.add_argument("--out", help="also write the markdown to this file")
    parser.add_argument("--one", nargs=2, metavar=("PROVIDER", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_process(args.one[0], int(args.one[1]))))
        return
    pythons = {"lorafx": sys.executable, "peft": sys.executable}
    if args.baseline_python:
        pythons["lorafx-baseline"] = args.baseline_python
    providers = list(pythons)
    times = {(p, n): [] for p in providers for n in args.layers}
    for round_ in range(args.rounds):
        for n in args.layers:
            order = providers if round_ % 2 == 0 else providers[::-1]  # none always runs first
            for p in order:
                one = "peft" if p == "peft" else "lorafx"
                out = subprocess.run([pythons[p], __file__, "--one", one, str(n)], check=True,
                                     capture_output=True, text=True).stdout
                times[p, n].append(json.loads(out.strip().splitlines()[-1]))
        text = table(times, providers, args.layers, round_ + 1)
        if args.out:  # after every round: a long run that is cut short still leaves its table
            with open(args.out, "w") as f:
                f.write(text + "\n")
    print(text)


def table(times, providers, layers, rounds) -> str:
    import peft
    import transformers

    lines = [
        f"## transform vs get_peft_model, Llama hidden 256, r=8 all-linear, CPU ({torch.get_num_threads()} threads), "
        f"{time.strftime('%Y-%m-%d')}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"median (min–max) of {rounds} fresh processes per cell, providers interleaved",
    ]
    ours = [p for p in providers if p != "peft"]
    for call in ("first", "second", "new"):
        lines.append(f"\n{call} call in the process (s), and / peft\n")
        lines.append("| layers | " + " | ".join(providers) + " | " + " | ".join(f"{p} / peft" for p in ours) + " |")
        lines.append("|---|" + "---|" * (len(providers) + len(ours)))
        for n in layers:
            median = {p: statistics.median(t[call] for t in times[p, n]) for p in providers}
            cells = [summary([t[call] for t in times[p, n]]) for p in providers]
            cells += [f"{median[p] / median['peft']:.2f}x" for p in ours]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
