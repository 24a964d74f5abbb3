"""Question: does an unmerged LoRA model run a no-grad forward as fast as the merged model?

One process, one Llama (default hidden 1024, 4 layers, vocab 32000, r=16 on all linear layers,
B drawn at random so the adapter is not a no-op), one batch (default 8 x 128 tokens). Providers,
all over the same weights and adapter (lorafx saves it, PEFT loads that folder):

    merged         PEFT's merge_and_unload: the plain transformers model with B·A folded in
    lorafx-merged  lorafx's merge(): the captured graph with B·A folded in
    lorafx         lorafx.transform, unmerged: no-grad calls fold W + scale·B·A per layer, once
                   (passes/no_grad_lora.py; the bytes it holds are printed under the table)
    lorafx-addmm   the same with merged_weights_budget=0: nothing folded, each branch summed
                   into the base output by one addmm
    peft           peft.PeftModel, unmerged

and with --compile the same under torch.compile: lorafx and lorafx-merged with backend
"lorafx", peft and merged with Inductor. The providers take turns (one forward each per round,
in a fresh random order every round, after warm-up calls), so load from other processes on a
shared machine hits them alike; the table gives medians, the spread (min-max), the ratio to
`merged` and the largest logit difference from PEFT unmerged, relative to PEFT's largest logit.

    python bench/bench_unmerged_forward.py [--rounds 15] [--batch 8] [--seq 128] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import random
import statistics
import tempfile
import time

import torch


def build_model(hidden: int, layers: int, vocab: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=2048,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def providers(args) -> dict:
    """name -> a callable running one forward on (input_ids, attention_mask), returning logits."""
    import peft

    import lorafx

    base = build_model(args.hidden, args.layers, args.vocab)
    spec = lorafx.LoraSpec(r=args.r, alpha=2 * args.r, targets="all-linear")
    lm = lorafx.transform(copy.deepcopy(base), spec).eval()
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as folder:
        lm.save_adapter(folder)
        addmm = lorafx.transform(copy.deepcopy(base), spec).eval()
        addmm.load_adapter(folder)
        addmm.merged_weights_budget = 0
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        merged = peft.PeftModel.from_pretrained(base, folder).merge_and_unload().eval()
    models = {"merged": merged, "lorafx-merged": lm.merge().eval(), "lorafx": lm, "lorafx-addmm": addmm, "peft": pm}
    if args.compile:
        compiled = {
            "lorafx compiled": torch.compile(lm, backend="lorafx"),
            "lorafx-merged compiled": torch.compile(models["lorafx-merged"], backend="lorafx"),
            "peft compiled": torch.compile(pm),
            "merged compiled": torch.compile(merged),
        }
        models.update(compiled)
    runs = {name: (lambda m: lambda ids, mask: m(input_ids=ids, attention_mask=mask).logits)(m) for name, m in models.items()}
    return runs, lm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile providers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, lm = providers(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        logits = {}
        compile_s = {}
        for name, run in runs.items():
            start = time.perf_counter()
            logits[name] = run(ids, mask)
            compile_s[name] = time.perf_counter() - start
            for _ in range(args.warmup - 1):
                run(ids, mask)
        order = list(runs)
        for _ in range(args.rounds):
            random.shuffle(order)
            for name in order:
                start = time.perf_counter()
                runs[name](ids, mask)
                times[name].append(time.perf_counter() - start)
    reference = logits["peft"]
    scale = reference.abs().max().item()
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"## Unmerged LoRA no-grad forward, CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {datetime.date.today()}")
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
          f"r={args.r}, all-linear, float32; {args.rounds} interleaved rounds after {args.warmup} warm-up calls\n")
    print("| provider | median (ms) | min-max (ms) | vs merged | vs lorafx-merged | max logit diff vs peft (relative) | first call (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, t in times.items():
        diff = (logits[name] - reference).abs().max().item() / scale
        print(f"| {name} | {med[name] * 1e3:.0f} | {min(t) * 1e3:.0f}-{max(t) * 1e3:.0f} | "
              f"{med[name] / med['merged']:.2f}x | {med[name] / med['lorafx-merged']:.2f}x | {diff:.1e} | "
              f"{compile_s[name]:.1f} |")
    adapted = sum(lm.graph_module.get_submodule(p).weight.nbytes for p in lm.lora_paths())
    print(f"\nlorafx holds {lm.merged_weights_used / 2**20:.0f} MiB of folded weights "
          f"(budget {lm.merged_weights_budget / 2**20:.0f} MiB; the adapted layers' weights are {adapted / 2**20:.0f} MiB, "
          f"the model's parameters {sum(p.nbytes for p in lm.parameters()) / 2**20:.0f} MiB).")


if __name__ == "__main__":
    main()
