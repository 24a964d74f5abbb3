"""Named adapters in one graph: load, set, disable, delete, mixed batches — PEFT as the oracle."""

import copy
import json

import peft
import pytest
import safetensors.torch
import torch
from conftest import tiny_model, token_batch

import lorafx
from lorafx.formats.adapters import AdapterError

# Three adapters that differ in everything a bank must pad or tell apart.
ADAPTERS = {
    "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "chat": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "tiny": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
}
GPT2_ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "b": dict(r=2, lora_alpha=2, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True),
}


def save_peft_adapters(tmp_path, arch, adapters):
    """PEFT-made adapters with random B (non-trivial), each saved to its own folder."""
    for i, (name, kwargs) in enumerate(adapters.items()):
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(init_lora_weights=False, **kwargs)
        peft.get_peft_model(tiny_model(arch), config).save_pretrained(tmp_path / name)
    return {name: tmp_path / name for name in adapters}


def peft_oracle(arch, dirs):
    model = peft.PeftModel.from_pretrained(tiny_model(arch), dirs[next(iter(dirs))], adapter_name=next(iter(dirs)))
    for name in list(dirs)[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    return model.eval()


def serving_model(arch, dirs, spec=None):
    lm = lorafx.transform(tiny_model(arch), spec or lorafx.LoraSpec(r=4, targets=["q_proj"])).eval()
    for name, directory in dirs.items():
        lm.load_adapter(directory, name=name)
    return lm


@pytest.mark.parametrize("arch, adapters", [("llama", ADAPTERS), ("gpt2", GPT2_ADAPTERS)])
def test_mixed_batch_equals_each_row_alone_and_peft(tmp_path, arch, adapters):
    dirs = save_peft_adapters(tmp_path, arch, adapters)
    lm = serving_model(arch, dirs, lorafx.LoraSpec(r=4, targets="all-linear") if arch == "gpt2" else None)
    assert lm.adapter_names == ["default", *adapters]
    theirs = peft_oracle(arch, dirs)
    rows = [*adapters, "__base__", "default", next(iter(adapters))]
    ids = token_batch(batch=len(rows), seq=5)
    with torch.no_grad():
        mixed = lm(ids, adapter_ids=rows).logits
        for i, name in enumerate(rows):
            # Each row alone, through the model with only that adapter active.
            with lm.disable_adapters() if name == "__base__" else _active(lm, name):
                alone = lm(ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        peft_rows = [r for r in rows if r != "default"]
        keep = [i for i, r in enumerate(rows) if r != "default"]
        expected = theirs(input_ids=ids[keep], adapter_names=peft_rows).logits
        torch.testing.assert_close(mixed[keep], expected, rtol=1e-5, atol=1e-5)
        # The default adapter (B = 0 at init) is the base model; the others are not.
        base = tiny_model(arch)(ids).logits
        torch.testing.assert_close(mixed[rows.index("default")], base[rows.index("default")], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[0], base[0], atol=1e-3)


class _active:
    def __init__(self, lm, name):
        self.lm, self.name = lm, name

    def __enter__(self):
        self.previous = self.lm.active_adapter
        self.lm.set_adapter(self.name)

    def __exit__(self, *exc):
        self.lm.set_adapter(self.previous)


def test_set_adapter_matches_peft_and_never_recaptures(tmp_path, monkeypatch):
    dirs = save_peft_adapters(tmp_path, "llama", ADAPTERS)
    lm = serving_model("llama", dirs)
    theirs = peft_oracle("llama", dirs)
    code = lm.graph_module.code
    monkeypatch.setattr(lorafx.core.model, "capture", lambda *a, **k: pytest.fail("re-captured"))
    ids = token_batch()
    with torch.no_grad():
        for name in ["chat", "sql", "tiny", "chat"]:
            lm.set_adapter(name)
            theirs.set_adapter(name)
            assert lm.active_adapter == name
            torch.testing.assert_close(lm(ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        lm(ids, adapter_ids=torch.tensor([0, 2]))
    assert lm.graph_module.code == code  # switching writes a buffer; the graph is the same


def test_disable_adapters_gives_the_base_model_and_training_still_works():
    """DPO's pattern: policy logits with the adapter, reference logits without, one backward."""
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets="all-linear"))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(std=0.1)
    ids = token_batch()
    policy = lm(ids, labels=ids)
    with lm.disable_adapters(), torch.no_grad():
        reference = lm(ids).logits
    torch.testing.assert_close(reference, tiny_model("llama")(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy.logits, reference, atol=1e-3)
    (policy.loss + (policy.logits - reference).pow(2).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lm.named_lora_parameters())
    assert lm(ids).logits.sub(policy.logits).abs().max() < 1e-6  # the adapter is back after the block


def test_delete_adapter_and_save_a_named_adapter(tmp_path):
    dirs = save_peft_adapters(tmp_path, "llama", ADAPTERS)
    lm = serving_model("llama", dirs)
    ids = token_batch()
    with torch.no_grad():
        lm.set_adapter("tiny")
        tiny = lm(ids).logits
        lm.save_adapter(tmp_path / "saved_sql", name="sql")
        lm.delete_adapter("chat")
        assert lm.adapter_names == ["default", "sql", "tiny"] and lm.active_adapter == "tiny"
        torch.testing.assert_close(lm(ids).logits, tiny, rtol=0, atol=0)
        torch.testing.assert_close(lm(ids, adapter_ids=[2, 2]).logits, tiny, rtol=0, atol=0)
        lm.delete_adapter("tiny")
        assert lm.active_adapter == "default"
    ours = safetensors.torch.load_file(tmp_path / "saved_sql" / "adapter_model.safetensors")
    theirs = safetensors.torch.load_file(dirs["sql"] / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    config = json.loads((tmp_path / "saved_sql" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)


def test_merge_folds_the_active_named_adapter(tmp_path):
    dirs = save_peft_adapters(tmp_path, "llama", ADAPTERS)
    lm = serving_model("llama", dirs)
    lm.set_adapter("chat")
    ids = token_batch()
    with torch.no_grad():
        merged = lm.merge()
        torch.testing.assert_close(merged(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert lm.adapter_names == ["default", *ADAPTERS]  # merge() leaves the model as it was


def test_nf4_base_serves_named_adapters(tmp_path):
    dirs = save_peft_adapters(tmp_path, "llama", {"sql": ADAPTERS["sql"], "tiny": ADAPTERS["tiny"]})
    spec = lorafx.LoraSpec(r=4, targets=["q_proj"], quantize="nf4")
    lm = serving_model("llama", dirs, spec)
    ids = token_batch(batch=3)
    with torch.no_grad():
        mixed = lm(ids, adapter_ids=["tiny", "__base__", "sql"]).logits
        with lm.disable_adapters():
            torch.testing.assert_close(mixed[1:2], lm(ids[1:2]).logits, rtol=1e-5, atol=1e-5)
        lm.set_adapter("sql")
        torch.testing.assert_close(mixed[2:], lm(ids[2:]).logits, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem(tmp_path):
    dirs = save_peft_adapters(tmp_path, "llama", {"sql": ADAPTERS["sql"]})
    single = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets=["q_proj"]))
    ids = token_batch()
    with pytest.raises(ValueError, match="adapter_ids= needs named adapters"):
        single(ids, adapter_ids=[0, 0])
    with pytest.raises(ValueError, match="only adapter and cannot be deleted"):
        single.delete_adapter("default")
    lm = serving_model("llama", dirs)
    with pytest.raises(ValueError, match="adapter id 2 is out of range: 2 adapters"):
        lm(ids, adapter_ids=[0, 2])
    with pytest.raises(ValueError, match="adapter id -2 is out of range"):
        lm(ids, adapter_ids=torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match="2 rows"):
        lm(ids, adapter_ids=["sql"])
    with pytest.raises(KeyError, match="'nope', which is not loaded"):
        lm(ids, adapter_ids=["sql", "nope"])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        lm(ids, adapter_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        lm.set_adapter("nope")
    with pytest.raises(AdapterError, match="already loaded"):
        lm.load_adapter(dirs["sql"], name="sql")
    with pytest.raises(ValueError, match="give load_adapter a name"):
        lm.load_adapter(dirs["sql"])
    with pytest.raises(ValueError, match="non-empty string"):
        lm.load_adapter(dirs["sql"], name="__base__")
    with lm.disable_adapters(), pytest.raises(ValueError, match="inside disable_adapters"):
        lm(ids, adapter_ids=[0, 1])
    # An adapter for another architecture, a layer the model lacks, a DoRA adapter.
    gpt2 = save_peft_adapters(tmp_path / "g", "gpt2", {"a": GPT2_ADAPTERS["a"]})
    with pytest.raises(AdapterError, match="not a linear layer of this model"):
        lm.load_adapter(gpt2["a"], name="a")
    tensors = safetensors.torch.load_file(dirs["sql"] / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()
    bad = tmp_path / "bad_shape"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((dirs["sql"] / "adapter_config.json").read_text())
    safetensors.torch.save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"has shape \(4, 31\), expected \(4, 32\)"):
        lm.load_adapter(bad, name="bad")
    dora = save_peft_adapters(tmp_path / "d", "llama", {"d": dict(r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)})
    with pytest.raises(AdapterError, match="DoRA"):
        lm.load_adapter(dora["d"], name="d")
    assert lm.adapter_names == ["default", "sql"]  # failed loads changed nothing
    dora_model = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=2, targets=["q_proj"], use_dora=True))
    with pytest.raises(AdapterError, match="DoRA"):
        dora_model.load_adapter(dirs["sql"], name="sql")
    assert copy.deepcopy(lm).adapter_names == ["default", "sql"]


def test_compiled_model_switches_adapters_without_recompiling(tmp_path):
    dirs = save_peft_adapters(tmp_path, "llama", {"sql": ADAPTERS["sql"], "tiny": ADAPTERS["tiny"]})
    lm = serving_model("llama", dirs)
    graphs = []  # node count of every graph Dynamo hands to the backend

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    compiled = torch.compile(lm, backend=backend)
    ids = token_batch()
    with torch.no_grad():
        for name in ["sql", "tiny", "sql"]:
            lm.set_adapter(name)
            torch.testing.assert_close(compiled(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)
        for rows in (["tiny", "sql"], ["__base__", "default"]):
            torch.testing.assert_close(compiled(ids, adapter_ids=rows).logits, lm(ids, adapter_ids=rows).logits)
    # One model graph, compiled once: ids are written by a host-side step (one graph break
    # before it) into a buffer the graph reads. Only tiny prologue frames may be re-traced.
    assert sum(n > 50 for n in graphs) == 1, graphs


def test_inline_multi_lora_gives_the_ops_logits(tmp_path):
    """The compile backend's CPU pass: multi_lora nodes as gathered-bank aten ops, same logits
    for mixed rows, one adapter for all rows, and the base model (id -1)."""
    from lorafx.passes import inline_multi_lora

    dirs = save_peft_adapters(tmp_path, "llama", {"sql": ADAPTERS["sql"], "tiny": ADAPTERS["tiny"]})
    lm = serving_model("llama", dirs)
    ids = token_batch()
    with torch.no_grad():
        for rows in (["tiny", "sql"], ["sql", "sql"], ["__base__", "tiny"], ["__base__", "__base__"]):
            expected = lm(ids, adapter_ids=rows).logits  # writes the graph's adapter-id buffer
            gm = copy.deepcopy(lm.graph_module)
            assert inline_multi_lora(gm).counts["inlined"] > 0
            assert not any(n.target == torch.ops.lorafx.multi_lora.default for n in gm.graph.nodes)
            torch.testing.assert_close(gm(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"], expected, rtol=1e-5, atol=1e-5)
