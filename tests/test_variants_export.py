"""Every variant merges and exports like plain LoRA: trained (random) adapter → merge() → .pt2
with only aten ops → the loaded program equals the unmerged model at two shapes."""

import peft
import pytest
import torch
from conftest import token_batch
from test_backend import one_layer_model
from test_export import aten_only

import lorafx


def randomized(lm):
    """A 'trained' adapter: every adapter parameter moved off its init."""
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return lm


def named_adapters(tmp_path):
    for i, (name, r) in enumerate([("a", 2), ("b", 4)]):
        torch.manual_seed(i)
        config = peft.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        peft.get_peft_model(one_layer_model("llama"), config).save_pretrained(tmp_path / name)
    lm = lorafx.transform(one_layer_model("llama"), lorafx.LoraSpec(r=4, targets=["v_proj"]))
    lm.load_adapter(tmp_path / "a", name="a")
    lm.load_adapter(tmp_path / "b", name="b")
    lm.set_adapter("b")
    return lm


VARIANTS = {
    "rslora": lambda tmp: randomized(lorafx.transform(one_layer_model("llama"), lorafx.LoraSpec(r=4, use_rslora=True))),
    "dora": lambda tmp: randomized(lorafx.transform(one_layer_model("llama"), lorafx.LoraSpec(r=4, use_dora=True))),
    "pissa": lambda tmp: randomized(lorafx.transform(one_layer_model("llama"), lorafx.LoraSpec(r=4, init="pissa"))),
    "loftq": lambda tmp: randomized(
        lorafx.transform(one_layer_model("llama"), lorafx.LoraSpec(r=4, init="loftq", quantize="nf4"))
    ),
    "ia3": lambda tmp: randomized(
        lorafx.transform(one_layer_model("llama"), lorafx.IA3Spec(targets="all-linear", feedforward=["down_proj"]))
    ),
    "vera": lambda tmp: randomized(lorafx.transform(one_layer_model("llama"), lorafx.VeraSpec(r=4))),
    "named adapters": named_adapters,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_merges_and_exports(tmp_path, variant):
    lm = VARIANTS[variant](tmp_path).eval()
    merged = lm.merge()
    path = tmp_path / "model.pt2"
    lorafx.export(merged, path, token_batch(2, 7))
    program = torch.export.load(path)
    assert aten_only(program)
    with torch.no_grad():
        for ids in (token_batch(3, 11, seed=3), token_batch(1, 4, seed=5)):
            expected = lm(ids).logits
            torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(program.module()(input_ids=ids)["logits"], expected, atol=1e-5, rtol=1e-5)
