"""modules_to_save: a classifier's new head trains in full and travels in the adapter, as PEFT."""

import copy

import peft
import pytest
import safetensors.torch
import torch
import transformers
from conftest import COMMON, tiny_model, token_batch

import lorafx
from lorafx.passes import NoTargetError


def classifier(arch="llama"):
    torch.manual_seed(0)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch](**COMMON, num_labels=3)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sequence_classifier_adapters_round_trip_with_peft(tmp_path, arch):
    base = classifier(arch)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear", init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        theirs.base_model.model.score.modules_to_save["default"].weight.normal_()  # a trained head
    theirs.save_pretrained(tmp_path / "peft")
    ids = token_batch()

    ours = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec.from_peft_config(tmp_path / "peft")).eval()
    assert set(ours.spec.modules_to_save) == set(theirs.peft_config["default"].modules_to_save)  # PEFT's task heads
    assert "score" not in " ".join(ours.lora_paths())  # the head gets no LoRA
    assert lorafx.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    ours.load_adapter(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)

    ours.save_adapter(tmp_path / "ours")
    saved = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in saved
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.merge()(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_moves_the_saved_head_and_lora_only():
    lm = lorafx.transform(classifier(), lorafx.LoraSpec(r=4, quantize="nf4"))
    assert lm.graph_module.score.weight.requires_grad and not hasattr(lm.graph_module.score, "weight_nf4")
    before = {name: p.detach().clone() for name, p in lm.graph_module.named_parameters()}
    optimizer = torch.optim.SGD(lm.trainable_parameters(), lr=0.1)
    ids = token_batch()
    lm(ids, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    changed = {name for name, p in lm.graph_module.named_parameters() if not torch.equal(p, before[name])}
    assert "score.weight" in changed
    assert changed <= {name for name, _ in lm.named_lora_parameters()}


def test_explicit_modules_to_save_on_a_causal_lm_and_bad_values():
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets=["q_proj"], modules_to_save=["lm_head"]))
    assert [name for name, _ in lm.named_lora_parameters() if "lora" not in name] == ["lm_head.weight"]
    none_saved = lorafx.transform(classifier(), lorafx.LoraSpec(r=4, modules_to_save=[]))
    assert none_saved.graph_module.score.weight.requires_grad is False
    with pytest.raises(ValueError, match="modules_to_save='all-linear' is invalid"):
        lorafx.LoraSpec(modules_to_save="all-linear")
    with pytest.raises(NoTargetError, match=r"modules_to_save=\('head',\) matches no module"):
        lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, modules_to_save=["head"]))


def test_sequence_classifier_loss_is_the_models_own():
    base = classifier()
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4))
    ids, labels = token_batch(), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, labels=labels).loss, base(input_ids=ids, labels=labels).loss)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 7\); LlamaForSequenceClassification expects"):
        lm(ids, labels=ids)


def test_disable_adapters_gives_the_base_model_after_the_saved_head_trained():
    base = classifier()
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4))
    optimizer = torch.optim.SGD(lm.trainable_parameters(), lr=0.5)
    ids = token_batch()
    lm(ids, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    assert not torch.equal(lm.graph_module.score.weight, base.score.weight)
    assert "original_weights.score:weight" not in lm.state_dict()  # the copy is not part of the model's state
    with torch.no_grad(), lm.disable_adapters():
        expected = base(input_ids=ids).logits
        torch.testing.assert_close(lm(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(lm(ids, position_ids=torch.arange(7)[None]).logits, expected, rtol=1e-6, atol=1e-6)
