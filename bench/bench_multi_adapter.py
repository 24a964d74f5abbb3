"""How fast is one batch whose rows each use a different LoRA adapter?

Question: serving N adapters from one model, is a mixed batch (lorafx's bank graph: one
`lorafx::multi_lora` node per layer, rows gathered per adapter) close to the base model's
speed, and how much faster than looping over the adapters one row group at a time? PEFT's
mixed batches (`adapter_names=`) and its set_adapter loop are measured in the same run.

Forward only (no_grad, eval), a Llama built from a config (random weights), N adapters of
rank r on every linear layer but the head, batch = N rows (one per adapter) x seq tokens.
Each round times every provider once, in turn; the table shows the median over rounds,
tokens/s and the ratio to the base model (above 1 = slower than the base model).

    python bench/bench_multi_adapter.py             # CPU, or CUDA when available
    python bench/bench_multi_adapter.py --small     # quick check

Benchmarks are not tests: nothing asserts.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import tempfile
import time

import peft
import torch
import transformers

import lorafx


def build(args, device):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
    )
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return transformers.AutoModelForCausalLM.from_config(config).to(device, dtype).eval()


def make_adapters(base, args, folder) -> list[str]:
    names = [f"adapter{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", init_lora_weights=False)
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(f"{folder}/{name}")
    return names


def providers(base, names, folder, ids, r):
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=r, targets="all-linear")).eval()
    for name in names:
        lm.load_adapter(f"{folder}/{name}", name=name)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{folder}/{names[0]}", adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(f"{folder}/{name}", adapter_name=name)
    theirs.eval()

    def base_model():
        with lm.disable_adapters():
            return lm(ids)

    def lorafx_mixed():
        return lm(ids, adapter_ids=names)

    def lorafx_one_adapter():  # every row the same adapter: the single-adapter cost
        lm.set_adapter(names[0])
        return lm(ids)

    def lorafx_loop():
        for i, name in enumerate(names):
            lm.set_adapter(name)
            lm(ids[i : i + 1])

    def peft_mixed():
        return theirs(input_ids=ids, adapter_names=names)

    def peft_loop():
        for i, name in enumerate(names):
            theirs.set_adapter(name)
            theirs(input_ids=ids[i : i + 1])

    return {
        "base model (lorafx, adapters disabled)": base_model,
        "lorafx mixed batch": lorafx_mixed,
        "lorafx one adapter for all rows": lorafx_one_adapter,
        "lorafx loop over adapters": lorafx_loop,
        "peft mixed batch (adapter_names=)": peft_mixed,
        "peft loop over adapters": peft_loop,
    }


def timed(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="hidden 128, 2 layers, seq 16, 2 rounds")
    args = parser.parse_args()
    if args.small:
        args.hidden, args.layers, args.seq, args.rounds, args.vocab = 128, 2, 16, 2, 1000
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = build(args, device)
    ids = torch.randint(0, args.vocab, (args.adapters, args.seq), device=device)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        names = make_adapters(base, args, folder)
        runs = providers(base, names, folder, ids, args.r)
        for fn in runs.values():  # warm-up
            fn()
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn, device))
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"## Mixed-adapter batches, forward, {where}, {datetime.date.today()}")
    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.adapters} adapters, "
        f"r={args.r}, all-linear; batch {args.adapters} rows (one per adapter) x {args.seq} tokens; "
        f"median of {args.rounds} rounds\n"
    )
    print("| provider | time (ms) | tokens/s | time vs base model |")
    print("|---|---|---|---|")
    tokens = args.adapters * args.seq
    base_time = statistics.median(next(iter(times.values())))
    for name, samples in times.items():
        t = statistics.median(samples)
        print(f"| {name} | {1000 * t:.1f} | {tokens / t:,.0f} | {t / base_time:.2f}x |")


if __name__ == "__main__":
    main()
