"""Question: how fast does a LoRA-fine-tuned model generate with lorafx, against PEFT and transformers?

Same process, same weights, interleaved rounds (the best round counts): Llama hidden 1024 ×
4 layers, vocab 32000, LoRA r=16 on all linear layers (random B, so the adapter is not a
no-op), greedy decoding of 256 new tokens after a 16-token prompt, 1 and 8 rows.

Providers:
- lorafx eager: `lm.generate` (the KV-cache decode graph, unmerged LoRA)
- lorafx compiled: `lm.generate(compile=True)` (the decode graph through backend "lorafx")
- peft: `PeftModel.generate` (transformers' generate, unmerged LoRA, DynamicCache)
- merged hf: `merge_and_unload()` then transformers' generate
- exported: `lorafx.export(lm.merge(), kv_cache=True)` run by the README's decode loop

Tokens/s counts new tokens of all rows. "flat" is the time per step over the last 32 steps
divided by that over steps 16–48 (1.0: a step costs the same at 270 tokens as at 30; without a
cache it would grow with the sequence). Every provider's tokens are checked against lorafx eager.

    python bench/bench_generate.py [--rounds 2] [--new 256]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Clock:
    """A transformers-style streamer that timestamps every new token (put after the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, tokens):
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def flatness(self) -> float:
        steps = [b - a for a, b in zip(self.times[1:], self.times[2:])]
        early, late = steps[16:48], steps[-32:]
        return (sum(late) / len(late)) / (sum(early) / len(early))


def readme_greedy():
    """The README's reference decode loop (the tested one)."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    code = readme.split("<!-- decode-loop -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope = {}
    exec(code.replace('program = torch.export.load("decoder.pt2").module()', ""), scope)
    return scope["greedy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new", type=int, default=256)
    args = parser.parse_args()

    import peft
    import transformers

    import lorafx

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    base = transformers.LlamaForCausalLM(config).eval()
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    tmp = tempfile.mkdtemp()
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                       init_lora_weights=False)).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)  # keep the adapted model's logits in a sane range
    theirs.save_pretrained(f"{tmp}/adapter")
    fresh = transformers.LlamaForCausalLM(config)
    fresh.load_state_dict(base_weights)
    lm = lorafx.transform(fresh, lorafx.LoraSpec.from_peft_config(f"{tmp}/adapter"))
    lm.load_adapter(f"{tmp}/adapter")
    lm.eval()
    merged_hf = lm.merge_and_unload().eval()
    greedy = readme_greedy()

    results, compile_s, export_s = {}, {}, {}
    for rows in (1, 8):
        ids = torch.randint(3, 32000, (rows, 16), generator=torch.Generator().manual_seed(rows))
        mask = torch.ones_like(ids)
        cache_len = -(-(16 + args.new) // 64) * 64
        t = time.perf_counter()
        lorafx.export(lm.merge(), f"{tmp}/decoder{rows}.pt2", ids, kv_cache=True, cache_len=cache_len)
        program = torch.export.load(f"{tmp}/decoder{rows}.pt2").module()
        export_s[rows] = time.perf_counter() - t
        t = time.perf_counter()
        lm.generate(ids, max_new_tokens=2, compile=True)
        compile_s[rows] = time.perf_counter() - t
        hf_args = dict(max_new_tokens=args.new, do_sample=False, min_new_tokens=args.new)
        providers = {
            "lorafx eager": lambda c: lm.generate(ids, max_new_tokens=args.new, streamer=c),
            "lorafx compiled": lambda c: lm.generate(ids, max_new_tokens=args.new, streamer=c, compile=True),
            "peft": lambda c: theirs.generate(input_ids=ids, attention_mask=mask, streamer=c, **hf_args),
            "merged hf": lambda c: merged_hf.generate(input_ids=ids, attention_mask=mask, streamer=c, **hf_args),
            "exported": lambda c: greedy(program, ids, mask, args.new, cache_len),
        }
        best = {}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, run in providers.items():
                    clock = Clock()
                    start = time.perf_counter()
                    out = run(clock)
                    seconds = time.perf_counter() - start
                    flat = clock.flatness() if len(clock.times) > 64 else float("nan")
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, flat, out)
        reference = best["lorafx eager"][2]
        for name, (seconds, flat, out) in best.items():
            results[(name, rows)] = (rows * args.new / seconds, flat, torch.equal(out, reference))

    print(f"## Generation, CPU ({platform.machine()}, {torch.get_num_threads()} threads), {datetime.date.today()}")
    print(f"Llama hidden 1024, 4 layers, vocab 32000, LoRA r=16 all-linear; prompt 16, {args.new} new tokens, greedy; "
          f"best of {args.rounds} interleaved rounds in one process\n")
    print("| provider | rows | tokens/s | vs peft | step cost late/early | same tokens as lorafx eager |")
    print("|---|---|---|---|---|---|")
    for rows in (1, 8):
        for name in ("lorafx eager", "lorafx compiled", "peft", "merged hf", "exported"):
            rate, flat, same = results[(name, rows)]
            ratio = rate / results[("peft", rows)][0]
            flat_text = "n/a" if flat != flat else f"{flat:.2f}"
            print(f"| {name} | {rows} | {rate:.1f} | {ratio:.2f}x | {flat_text} | {'yes' if same else 'NO'} |")
    print(f"\nOne-time costs: compile (backend lorafx, first generate) {compile_s[1]:.0f} s (1 row), "
          f"{compile_s[8]:.0f} s (8 rows); export kv_cache=True {export_s[1]:.1f} s / {export_s[8]:.1f} s.")


if __name__ == "__main__":
    main()
