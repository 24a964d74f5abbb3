"""DoRA against PEFT's use_dora: forward, merge, adapter files both ways."""

import copy

import peft
import pytest
import torch
from conftest import tiny_model, token_batch

import lorafx


@pytest.mark.parametrize("arch, dropout", [("llama", 0.0), ("gpt2", 0.0), ("qwen2", 0.1)])
def test_dora_equals_peft(tmp_path, arch, dropout):
    model = tiny_model(arch)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", use_dora=True,
                             init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():  # a trained-looking magnitude, not just ‖W‖
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    spec = lorafx.LoraSpec.from_peft_config(tmp_path / "peft")
    assert spec.use_dora
    ours = lorafx.transform(copy.deepcopy(model), spec).eval()
    assert lorafx.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    ours.load_adapter(tmp_path / "peft")
    ids = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = ours.merge()
        assert list(merged.named_lora_parameters()) == []
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(theirs).merge_and_unload()(input_ids=ids).logits, merged(ids).logits,
                                   rtol=1e-5, atol=1e-5)
    ours.save_adapter(tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_dora_trains_in_training_mode_with_dropout():
    model = tiny_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", use_dora=True)).train()
    ours = lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=8, dropout=0.1, use_dora=True)).train()
    with torch.no_grad():
        for name, p in ours.named_lora_parameters():
            p.copy_(peft.get_peft_model_state_dict(theirs)["base_model.model." + name])
    ids = token_batch()
    torch.manual_seed(0)
    loss_theirs = theirs(input_ids=ids, labels=ids).loss
    torch.manual_seed(0)
    loss_ours = ours(ids, labels=ids).loss
    loss_ours.backward()
    magnitude = dict(ours.named_lora_parameters())["model.layers.0.mlp.up_proj.lora_magnitude_vector"]
    assert magnitude.grad is not None and magnitude.grad.abs().sum() > 0
    assert abs(loss_ours.item() - loss_theirs.item()) < 0.05  # different dropout masks, same model


def test_dora_on_nf4_base_merges_to_plain_weights():
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, quantize="nf4", use_dora=True)).eval()
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(lm.merge()(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)
