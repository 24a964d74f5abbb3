"""What the training benchmarks measure, the same way for every provider: median step time and
peak RSS growth over AdamW steps on a fixed batch (input_ids + attention_mask + labels, as a
tokenizer gives them), after one warm-up step so the optimizer state already exists (its time,
compile included where the model is compiled, is `first_s`)."""

from __future__ import annotations

import statistics
import time

import torch

from lorafx.runtime.memory import reset_peak, status_kib


def measure_steps(model, params, vocab: int, batch: int, seq: int, steps: int) -> dict:
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    reset_peak()
    rss_before = status_kib("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "first_s": first, "peak_mib": (status_kib("VmHWM") - rss_before) / 1024}
