"""Multi-adapter serving: `lorafx serve` throughput and latency with N concurrent clients.

One process, one run, side by side:
- mixed: the server with 4 adapters resident, clients' requests round-robin over them;
- base: the same server, every request for the base model (the ceiling mixed batching aims at);
- sequential merged: one merged transformers model per adapter, requests answered one at a time
  with transformers' generate (what serving without multi-adapter batching does).
Each request: a 16-token prompt, 64 new tokens (ignore_eos), greedy. Clients are threads with
httpx against 127.0.0.1. Prints a markdown table; ratios are against base at the same N (and the
same server). `--compile` adds a second server whose decode graphs go through torch.compile.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import platform
import statistics
import tempfile
import time

import httpx
import peft
import torch
import transformers

from lorafx.serving.engine import Engine
from lorafx.serving.load import load
from lorafx.serving.server import Server

ADAPTERS = ["a0", "a1", "a2", "a3"]
PROMPT, NEW = 16, 64


def build(root: str, hidden: int, layers: int, vocab: int):
    import tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(f"{root}/base")
    words = [f"w{i}" for i in range(vocab)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(f"{root}/base")
    dirs = {}
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(f"{root}/base"), cfg).save_pretrained(
            f"{root}/{name}")
        dirs[name] = f"{root}/{name}"
    return dirs, words


def requests_for(n_clients: int, words, vocab: int):
    g = torch.Generator().manual_seed(n_clients)
    count = max(4, 2 * n_clients)
    return [" ".join(words[int(t)] for t in torch.randint(3, vocab, (PROMPT,), generator=g)) for _ in range(count)]


def run_server(srv, prompts, models, n_clients):
    http = httpx.Client(base_url=srv.url, timeout=600, limits=httpx.Limits(max_connections=64))
    latencies, tokens = [], []

    def ask(i):
        t = time.perf_counter()
        r = http.post("/v1/completions", json={"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": NEW,
                                               "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        latencies.append(time.perf_counter() - t)
        tokens.append(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(ask, range(len(prompts))))
    wall = time.perf_counter() - start
    return sum(tokens) / wall, latencies


def run_sequential(merged, tokenizer, prompts):
    latencies, total = [], 0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        model = merged[ADAPTERS[i % len(ADAPTERS)]]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        latencies.append(time.perf_counter() - t)
        total += out.shape[1] - ids.shape[1]
    return total / (time.perf_counter() - start), latencies


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--compile", action="store_true", help="also a server with --compile (decode graphs through torch.compile)")
    args = parser.parse_args()
    root = tempfile.mkdtemp()
    dirs, words = build(root, args.hidden, args.layers, args.vocab)
    servers, startup = {}, {}
    for mode in ["eager", "compiled"] if args.compile else ["eager"]:
        lm, tokenizer = load(f"{root}/base", dirs)
        start = time.perf_counter()
        engine = Engine(lm, tokenizer, max_batch=max(args.clients), max_model_len=PROMPT + NEW, max_queue=256,
                        compile=mode == "compiled")
        servers[mode] = Server(engine, "base", dirs).start()
        startup[mode] = time.perf_counter() - start
    merged = {}
    for name in ADAPTERS:
        base = transformers.LlamaForCausalLM.from_pretrained(f"{root}/base")
        merged[name] = peft.PeftModel.from_pretrained(base, dirs[name]).merge_and_unload().eval()
    rows = []
    try:
        for mode, srv in servers.items():  # warm-up: eager builds a bucket's graph on first use (--compile: at start)
            for n in args.clients:  # every client count's bucket, base-only and mixed
                for models in (["base", *ADAPTERS], ["base"]):
                    run_server(srv, requests_for(n, words, args.vocab)[:n], models, n)
        for n in args.clients:
            prompts = requests_for(n, words, args.vocab)
            for mode, srv in servers.items():
                label = "lorafx serve" + (" --compile" if mode == "compiled" else "")
                base_rate, base_lat = run_server(srv, prompts, ["base"], n)
                mixed_rate, mixed_lat = run_server(srv, prompts, ADAPTERS, n)
                rows.append((n, f"{label}, 4 adapters mixed", mixed_rate, base_rate, mixed_lat))
                rows.append((n, f"{label}, base model only", base_rate, base_rate, base_lat))
            if n == 8:
                seq_rate, seq_lat = run_sequential(merged, tokenizer, prompts)
                rows.append((n, "merged model per adapter, sequential (HF generate)", seq_rate, base_rate, seq_lat))
    finally:
        for srv in servers.values():
            srv.stop()
    print(f"## Serving, CPU ({platform.machine()}, {torch.get_num_threads()} threads), {datetime.date.today()}")
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; 4 adapters r=16 all-linear; "
          f"prompt {PROMPT} + {NEW} new tokens per request (greedy, ignore_eos); 2N requests (at least 4) per row; "
          f"server --max-batch {max(args.clients)}\n")
    print("| clients | provider | tokens/s | vs base-only | p50 latency (s) | p99 latency (s) |")
    print("|---|---|---|---|---|---|")
    for n, name, rate, base_rate, lat in rows:
        print(f"| {n} | {name} | {rate:.1f} | {rate / base_rate:.2f}x | {statistics.median(lat):.2f} | {pct(lat, 0.99):.2f} |")
    print("\nServer start-up (graph capture; --compile: every batch bucket compiled): "
          + ", ".join(f"{mode} {seconds:.1f} s" for mode, seconds in startup.items()))
    seq8 = next((r for r in rows if "sequential" in r[1]), None)
    for mixed8 in [r for r in rows if r[0] == 8 and "mixed" in r[1]] if seq8 else []:
        print(f"\nAt 8 clients, {mixed8[1]}: {mixed8[2] / mixed8[3]:.2f}x base-only (target >= 0.8x), "
              f"{mixed8[2] / seq8[2]:.2f}x the sequential merged-model baseline (target >= 3x).")


if __name__ == "__main__":
    main()
