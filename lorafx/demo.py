"""The README's main job: LoRA fine-tuning of a built-in tiny Llama on a built-in text.

Byte-level tokens, so no tokenizer download; the model is built from a config (random
weights), which is why the point is the mechanics — loss falls, adapter saved in PEFT
format, merged model equals the unmerged one — not the quality of the text.
"""

from __future__ import annotations

import os
import time

import torch
import transformers

from . import api
from .spec import LoraSpec

TEXT = (
    "LoRA freezes the pretrained weights and learns a low-rank update B times A for each "
    "linear layer. QLoRA stores the frozen weights in four-bit NormalFloat with double "
    "quantized scales, so a large model fine-tunes on a single GPU. lorafx captures the model "
    "as a graph and rewrites it with passes: match the linear layers, insert the LoRA branch, "
    "quantize, fuse, and merge for deployment. "
)


def default_model(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def batches(text: str, seq: int, batch: int, generator: torch.Generator):
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    while True:
        starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
        yield torch.stack([data[s : s + seq] for s in starts])


def run(steps: int = 200, out: str = "out/demo", seq: int = 64, batch: int = 8, log=print) -> dict:
    model = default_model()
    spec = LoraSpec(r=16, alpha=32, dropout=0.05, targets="all-linear")
    lm = api.transform(model, spec).train()
    log(f"model: built-in tiny Llama (random init, {sum(p.numel() for p in model.parameters()):,d} params), byte tokens")
    trainable, total = api.count_parameters(lm)
    log(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=3e-3)
    data = batches(TEXT, seq, batch, torch.Generator().manual_seed(0))
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        ids = next(data)
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            rate = step * batch * seq / (time.perf_counter() - start)
            log(f"step {step:4d}/{steps}  loss {loss.item():.3f}  {rate:,.0f} tokens/s")
    adapter_dir = os.path.join(out, "adapter")
    lm.save_adapter(adapter_dir)
    lm.eval()
    merged = lm.merge()
    probe = next(data)
    with torch.no_grad():
        diff = (merged(probe).logits - lm(probe).logits).abs().max().item()
    log(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged vs unmerged max |Δlogit| = {diff:.2e}")
    log(f"adapter (PEFT format): {adapter_dir}")
    return {"losses": losses, "adapter": adapter_dir, "merge_diff": diff}
