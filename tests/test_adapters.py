"""PEFT-format adapters: both directions against real PEFT, and every bad input."""

import copy
import json
import os

import peft
import pytest
import safetensors.torch
import torch
from conftest import tiny_model, token_batch

import lorafx


@pytest.mark.parametrize("arch, rslora", [("llama", False), ("llama", True), ("gpt2", False), ("phi3", True)])
def test_peft_saves_we_load_and_we_save_peft_loads(tmp_path, arch, rslora):
    spec = lorafx.LoraSpec(r=4, alpha=16, targets="all-linear", use_rslora=rslora)
    model = tiny_model(arch)
    base_for_peft = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=rslora,
                             init_lora_weights=False)  # random B: a non-trivial adapter
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ids = token_batch()

    ours = lorafx.transform(model, lorafx.LoraSpec.from_peft_config(tmp_path / "peft")).eval()
    ours.load_adapter(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)

    ours.save_adapter(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    reloaded = peft.PeftModel.from_pretrained(base_for_peft, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert spec.use_rslora == json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_rslora"]


def test_config_has_peft_fields_and_short_target_names(tmp_path):
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    lm.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert set(peft.LoraConfig().to_dict()) >= set(config)  # every field we write is a LoraConfig field
    # A regex that picks one layer's q_proj cannot be said with short names: full paths instead.
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets=r"model\.layers\.1\.self_attn\.q_proj"))
    lm.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.1.self_attn.q_proj"
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    lm.save_adapter(folder)
    return lm, folder


def _copy_adapter(src, dst, config_edit=None, tensors_edit=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(src / "adapter_model.safetensors")
    if config_edit:
        config_edit(config)
    if tensors_edit:
        tensors_edit(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(tensors, dst / "adapter_model.safetensors")
    return dst


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "config_edit, tensors_edit, message",
    [
        (lambda c: c.update(r=8), None, "adapter r=8 but the model was transformed with r=4"),
        (lambda c: c.update(lora_alpha=32), None, "lora_alpha=32"),
        (lambda c: c.pop("target_modules"), None, "no 'target_modules' field"),
        (lambda c: c.update(peft_type="IA3"), None, "LORA adapters only"),
        (lambda c: c.update(use_dora=True), None, "use_dora=True but the model has"),
        (None, lambda t: t.pop(KEY), f"adapter lacks {KEY}"),
        (None, lambda t: t.update({KEY.replace("q_proj", "k_proj"): t[KEY].clone()}), "which this model has no LoRA layer"),
        (None, lambda t: t.update({KEY: torch.zeros(4, 5)}), r"has shape \(4, 5\), the model expects \(4, 32\)"),
        (None, lambda t: t.update({"model.x": t.pop(KEY)}), "PEFT keys start with"),
    ],
)
def test_mismatched_adapter_is_refused_and_nothing_loaded(tmp_path, saved, config_edit, tensors_edit, message):
    lm, folder = saved
    bad = _copy_adapter(folder, tmp_path / "bad", config_edit, tensors_edit)
    before = {n: p.clone() for n, p in lm.named_lora_parameters()}
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.add_(1.0)
    changed = {n: p.clone() for n, p in lm.named_lora_parameters()}
    with pytest.raises(lorafx.AdapterError, match=message):
        lm.load_adapter(bad)
    assert all(torch.equal(p, changed[n]) for n, p in lm.named_lora_parameters())
    lm.load_adapter(folder)
    assert all(torch.equal(p, before[n]) for n, p in lm.named_lora_parameters())


def test_corrupt_missing_and_pickle_files(tmp_path, saved):
    lm, folder = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lm.load_adapter(tmp_path / "nowhere")
    corrupt = _copy_adapter(folder, tmp_path / "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(lorafx.AdapterError, match="not a valid safetensors file"):
        lm.load_adapter(corrupt)
    pickled = _copy_adapter(folder, tmp_path / "pickled")
    os.remove(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(lorafx.AdapterError, match="pickle"):
        lm.load_adapter(pickled)
    bad_json = _copy_adapter(folder, tmp_path / "badjson")
    (bad_json / "adapter_config.json").write_text("{r: 4")
    with pytest.raises(lorafx.AdapterError, match="not valid JSON"):
        lm.load_adapter(bad_json)


def test_failed_save_leaves_existing_files_intact(tmp_path, saved, monkeypatch):
    lm, folder = saved
    lm.save_adapter(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with torch.no_grad():
        next(iter(lm.trainable_parameters())).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        lm.save_adapter(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
