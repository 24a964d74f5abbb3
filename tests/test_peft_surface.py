"""LoraModel's PeftModel / PreTrainedModel surface agrees with PEFT on the same model."""

import contextlib
import copy
import io

import peft
import pytest
import torch
from conftest import tiny_model, token_batch

import lorafx


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_listed_members_agree_with_peft(tmp_path, arch):
    base = tiny_model(arch)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4))
    assert lm.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    printed = [io.StringIO(), io.StringIO()]
    for model, out in zip((lm, theirs), printed):
        with contextlib.redirect_stdout(out):
            model.print_trainable_parameters()
    assert printed[0].getvalue() == printed[1].getvalue()
    for only_trainable in (False, True):
        assert lm.num_parameters(only_trainable=only_trainable) == theirs.num_parameters(only_trainable=only_trainable)
    assert lm.num_parameters(exclude_embeddings=True) == theirs.num_parameters(exclude_embeddings=True)
    assert (lm.device, lm.dtype) == (theirs.device, theirs.dtype)
    assert lm.generation_config.to_dict() == theirs.generation_config.to_dict()
    assert lm.loss_type == base.loss_type
    ours_config, their_config = lm.peft_config["default"], theirs.peft_config["default"]
    assert type(ours_config) is type(their_config) and ours_config.r == their_config.r
    assert set(their_config.target_modules) == set(lm.lora_paths())  # PEFT stores the layers it adapted
    assert lm.get_base_model() is lm
    torch.testing.assert_close(lm.get_input_embeddings().weight, theirs.get_input_embeddings().weight)
    torch.testing.assert_close(lm.get_output_embeddings().weight, theirs.get_output_embeddings().weight)
    lm.enable_input_require_grads()
    lm.add_model_tags(["sft"])
    assert lm.model_tags == ["sft"]

    ids = token_batch()
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(std=0.1)
    backbone = lm.base_model(input_ids=ids).last_hidden_state
    head = lm.get_output_embeddings()
    torch.testing.assert_close(head(backbone), lm(ids).logits, rtol=1e-5, atol=1e-5)
    with lm.disable_adapter():
        torch.testing.assert_close(lm(ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm.base_model(input_ids=ids).last_hidden_state,
                                   base.base_model(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)

    lm.save_pretrained(tmp_path / "adapter")
    reloaded = lorafx.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert not reloaded.training and not any(p.requires_grad for p in reloaded.parameters())
    trainable = lorafx.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter", is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == lm.get_nb_trainable_parameters()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, lm.eval()(ids).logits)
    with pytest.raises(TypeError, match="takes the base model"):
        lorafx.LoraModel.from_pretrained(str(tmp_path), tmp_path / "adapter")


def test_gpt2_adapter_is_causal_lm_and_loads_in_auto_peft_model(tmp_path):
    base = tiny_model("gpt2")
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(std=0.1)
    lm.save_pretrained(tmp_path / "adapter")
    assert lm.peft_config["default"].task_type == "CAUSAL_LM"
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, lm.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_checkpointing_switch_is_in_place_and_refuses_what_it_cannot_do():
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4))
    graph = lm.graph_module
    ids = token_batch()
    before = lm(ids, labels=ids).loss
    lm.gradient_checkpointing_enable({"use_reentrant": False})
    assert lm.graph_module is graph and lm.is_gradient_checkpointing
    assert lm.pass_results[-1].counts["layers"] == 2
    assert torch.equal(lm(ids, labels=ids).loss, before)
    lm.gradient_checkpointing_disable()
    assert not lm.is_gradient_checkpointing and torch.equal(lm(ids, labels=ids).loss, before)
    with pytest.raises(ValueError, match=r"kwargs \['preserve_rng_state'\] are not supported"):
        lm.gradient_checkpointing_enable({"preserve_rng_state": True})
    with pytest.raises(ValueError, match="every_n_layers=2"):
        lm.activation_checkpointing_enable(every_n_layers=2)


def test_bf16_base_trains_fp32_adapters_as_peft():
    base = tiny_model("llama").to(torch.bfloat16)
    config = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec.from_peft_config(config))
    kept = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4, autocast_adapter_dtype=False))
    assert {p.dtype for _, p in lm.named_lora_parameters()} == {torch.float32} and lm.dtype == torch.bfloat16
    assert {p.dtype for _, p in kept.named_lora_parameters()} == {torch.bfloat16}
    state = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for name, p in lm.named_lora_parameters():
            p.copy_(state["base_model.model." + name])
    start = {name: p.detach().clone() for name, p in lm.named_lora_parameters()}
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, theirs(input_ids=ids).logits)
    for model, params in ((lm, lm.trainable_parameters()), (theirs, [p for p in theirs.parameters() if p.requires_grad])):
        opt = torch.optim.AdamW(params, lr=2e-5)
        for _ in range(20):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    state = peft.get_peft_model_state_dict(theirs)
    unchanged = [(p == start[name]).float().mean().item() for name, p in lm.named_lora_parameters() if "lora_A" in name]
    assert max(unchanged) < 0.01  # in bf16, most lora_A entries never move at this learning rate
    for name, p in lm.named_lora_parameters():  # the same updates, up to bf16 activations' rounding in the backward
        theirs_update = state["base_model.model." + name] - start[name]
        assert (p - start[name] - theirs_update).norm() <= 0.1 * theirs_update.norm()
    merged = lm.merge()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with pytest.raises(TypeError, match="takes a peft.LoraConfig, a dict or an adapter folder, got int"):
        lorafx.LoraSpec.from_peft_config(3)
