"""(IA)³: IA3Spec, the insert_ia3 / merge_ia3 passes and PEFT's IA3 adapter format, with PEFT as the oracle."""

import copy
import json
import os

import peft
import pytest
import safetensors.torch
import torch
from conftest import tiny_model, token_batch

import lorafx
from lorafx.core.capture import capture
from lorafx.passes import NoTargetError, insert_ia3, match_linears
from lorafx.passes.common import aten
from lorafx.passes.insert_ia3 import IA3

# (targets, feedforward, task_type) as a PEFT user writes them: all-linear on Llama, PEFT's own
# defaults on GPT-2 (Conv1D). lorafx writes task_type CAUSAL_LM for *ForCausalLM and *LMHeadModel classes.
CASES = {
    "llama": ("all-linear", ["down_proj"], "CAUSAL_LM"),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"], "CAUSAL_LM"),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_peft_saves_we_load_we_save_peft_loads_and_merges_agree(tmp_path, arch):
    targets, feedforward, task_type = CASES[arch]
    model = tiny_model(arch)
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type,
                            init_ia3_weights=False)  # random l: a non-trivial adapter
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ids = token_batch()

    # PEFT's all-linear folder lists full paths as targets but "down_proj" as feedforward, which
    # PEFT's literal subset check then refuses to load; lorafx checks the subset on the layers.
    ours = lorafx.transform(copy.deepcopy(model), lorafx.IA3Spec.from_peft_config(tmp_path / "peft")).eval()
    ours.load_adapter(tmp_path / "peft")
    assert lorafx.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)

    ours.save_adapter(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = safetensors.torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_saved = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in peft_saved.items()}
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_config) == set(peft_config) - {"peft_version"}
    # Lists are compared through PEFT loading them; without a task type PEFT records the model class in auto_mapping.
    same = set(ours_config) - {"target_modules", "feedforward_modules"} - ({"auto_mapping"} if task_type is None else set())
    assert {k: ours_config[k] for k in same} == {k: peft_config[k] for k in same}
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    merged = ours.merge()
    assert merged.pass_results[0].counts["modules"] == len(saved)
    assert list(merged.named_lora_parameters()) == [] and not any(IA3 in n.meta for n in merged.graph_module.graph.nodes)
    assert len(list(ours.named_lora_parameters())) == len(saved)  # merge() left ours as it was
    peft_merged = theirs.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    ours_weights, peft_weights = merged.graph_module.state_dict(), peft_merged.state_dict()
    scaled = {k.removeprefix("base_model.model.").replace("ia3_l", "weight") for k in peft_saved}
    assert scaled <= set(ours_weights) & set(peft_weights)
    for name in set(ours_weights) & set(peft_weights):  # scaled weights and biases, and everything else
        torch.testing.assert_close(ours_weights[name], peft_weights[name], rtol=1e-6, atol=1e-6)


def test_pass_inserts_tagged_scales_and_peft_shaped_vectors():
    gm = capture(tiny_model("llama")).graph_module
    match_linears(gm)
    before = len(gm.graph.nodes)
    spec = lorafx.IA3Spec(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])  # PEFT's Llama default
    assert insert_ia3(gm, spec).counts == {"linear": 15, "scaled_inputs": 2, "scaled_outputs": 4, "modules": 6}
    assert len(gm.graph.nodes) == before + 6 * 3
    roles = [n.meta[IA3][1] for n in gm.graph.nodes if IA3 in n.meta]
    assert (roles.count("input"), roles.count("output"), roles.count("vector")) == (2, 4, 6)
    down = next(n for n in gm.graph.nodes if n.meta.get(IA3) == ("model.layers.0.mlp.down_proj", "input"))
    assert down.target == aten.mul.Tensor and next(iter(down.users)).target == aten.linear.default
    assert gm.get_submodule("model.layers.0.mlp.down_proj").ia3_l.shape == (1, 48)  # (1, in): scales the input
    assert gm.get_submodule("model.layers.0.self_attn.k_proj").ia3_l.shape == (16, 1)  # (out, 1): the output
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == [
        f"model.layers.{i}.{m}.ia3_l" for i in (0, 1) for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in gm.named_parameters() if n.endswith("ia3_l"))


def test_starts_unchanged_and_one_step_trains_only_the_vectors():
    model = tiny_model("gpt2")
    ids = token_batch()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    lm = lorafx.transform(model, lorafx.IA3Spec(targets=["c_attn", "c_fc", "mlp.c_proj"], feedforward=["mlp.c_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(lm.eval()(ids).logits, base)  # l = 1 everywhere
    lm.train()
    vectors = dict(lm.named_lora_parameters())
    assert lm.trainable_parameters() == list(vectors.values()) and len(vectors) == 6
    before = {n: p.detach().clone() for n, p in lm.graph_module.named_parameters()}
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
    lm(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in lm.graph_module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(vectors)
    with lm.disable_adapters(), torch.no_grad():
        torch.testing.assert_close(lm.eval()(ids).logits, base)  # disable_adapters runs the base graph


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=["q_proj"], feedforward=["down_proj"]), r"IA3Spec.feedforward=\('down_proj',\) is invalid: allowed is a subset"),
        (dict(targets="all-linear", feedforward="all-linear"), "IA3Spec.feedforward='all-linear' is invalid"),
        (dict(targets=[], feedforward=[]), r"IA3Spec.targets=\[\] is invalid"),
        (dict(targets="(", feedforward=[]), "IA3Spec.targets='\\(' is invalid: allowed is a valid regex"),
        (dict(targets=["q_proj"], feedforward=[], exclude=3), "IA3Spec.exclude=3 is invalid"),
        (dict(targets=["q_proj"], feedforward=[], init="ones"), "IA3Spec.init='ones' is invalid: allowed is True"),
    ],
)
def test_bad_spec_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorafx.IA3Spec(**kwargs)


def test_spec_accepts_feedforward_covered_by_targets_and_checks_the_model():
    lorafx.IA3Spec(targets=["c_proj", "c_attn"], feedforward=["mlp.c_proj"])  # mlp.c_proj layers are c_proj targets
    with pytest.raises(ValueError, match="selects model.layers.0.mlp.down_proj, which targets=.* does not"):
        lorafx.transform(tiny_model("llama"), lorafx.IA3Spec(targets=r".*\.k_proj", feedforward=["down_proj"]))
    with pytest.raises(NoTargetError, match=r"IA3Spec.targets=\('q_proj',\).*transformer.h.0.attn.c_attn"):
        lorafx.transform(tiny_model("gpt2"), lorafx.IA3Spec(targets=["q_proj"], feedforward=[]))
    with pytest.raises(TypeError, match="lorafx.LoraSpec, IA3Spec or VeraSpec"):
        lorafx.transform(tiny_model("gpt2"), peft.IA3Config())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    spec = lorafx.IA3Spec(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"], init=False)
    ia3 = lorafx.transform(tiny_model("llama"), spec)
    ia3.save_adapter(root / "ia3")
    lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=2, targets=["k_proj"])).save_adapter(root / "lora")
    flipped = lorafx.IA3Spec(targets=["k_proj", "v_proj", "down_proj"], feedforward=["v_proj"])
    lorafx.transform(tiny_model("llama"), flipped).save_adapter(root / "flipped")
    return ia3, root


@pytest.mark.parametrize(
    "folder, message",
    [
        ("lora", "peft_type='LORA', but this is an \\(IA\\)³ model, which loads IA3 adapters only"),
        ("flipped", r"down_proj.ia3_l has shape \(32, 1\), the model expects \(1, 48\): the adapter scales the layer's output"),
    ],
)
def test_mismatched_adapter_is_refused_and_nothing_loaded(folders, folder, message):
    lm, root = folders
    before = {n: p.clone() for n, p in lm.named_lora_parameters()}
    with pytest.raises(lorafx.AdapterError, match=message):
        lm.load_adapter(root / folder)
    assert all(torch.equal(p, before[n]) for n, p in lm.named_lora_parameters())
    with pytest.raises(lorafx.AdapterError, match="named adapters are LoRA only"):
        lm.load_adapter(root / "ia3", name="other")


def test_ia3_adapter_into_lora_model_is_refused(folders):
    _, root = folders
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=2, targets=["k_proj"]))
    with pytest.raises(lorafx.AdapterError, match="LORA adapters only; for this one transform with lorafx.IA3Spec.from_peft_config"):
        lm.load_adapter(root / "ia3")
    config = json.loads((root / "ia3" / "adapter_config.json").read_text())
    assert (config["target_modules"], config["feedforward_modules"]) == (["down_proj", "k_proj", "v_proj"], ["down_proj"])
