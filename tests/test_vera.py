"""VeRA: VeraSpec, the insert_vera / merge_vera passes and PEFT's VERA adapter format, with PEFT as the oracle."""

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
from lorafx.passes import NoTargetError, insert_vera, match_linears
from lorafx.passes.insert_vera import VERA

# (targets, task_type, save_projection): all-linear on Llama, GPT-2's Conv1D layers with the projections
# regenerated from the seed. lorafx writes task_type CAUSAL_LM for *ForCausalLM and *LMHeadModel classes.
CASES = {
    "llama": ("all-linear", "CAUSAL_LM", True),
    "gpt2": (["c_attn", "c_fc"], "CAUSAL_LM", False),
}


@pytest.mark.filterwarnings("ignore:Specified to not")  # PEFT's warning about save_projection=False
@pytest.mark.parametrize("arch", list(CASES))
def test_peft_saves_we_load_we_save_peft_loads_and_merges_agree(tmp_path, arch):
    targets, task_type, save_projection = CASES[arch]
    model = tiny_model(arch)
    config = peft.VeraConfig(r=4, target_modules=targets, task_type=task_type, projection_prng_key=3,
                             save_projection=save_projection, init_weights=False)  # λ_b = 1: a non-trivial adapter
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ids = token_batch()

    ours = lorafx.transform(copy.deepcopy(model), lorafx.VeraSpec.from_peft_config(tmp_path / "peft")).eval()
    for name in ("vera_A", "vera_B"):  # the same draws from the same seed
        assert torch.equal(ours.graph_module.get_buffer(name), getattr(theirs.base_model, name)["default"])
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
    assert ("base_model.vera_A" in saved) == save_projection
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_config) == set(peft_config) - {"peft_version"}
    # target_modules is compared through PEFT loading it; without a task type PEFT records the model class.
    same = set(ours_config) - {"target_modules"} - ({"auto_mapping"} if task_type is None else set())
    assert {k: ours_config[k] for k in same} == {k: peft_config[k] for k in same}
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    merged = ours.merge()
    assert merged.pass_results[0].counts["modules"] == len(saved) // 2 - save_projection
    assert list(merged.named_lora_parameters()) == [] and not any(VERA in n.meta for n in merged.graph_module.graph.nodes)
    assert not {"vera_A", "vera_B"} & set(dict(merged.graph_module.named_buffers()))
    peft_merged = theirs.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    ours_weights, peft_weights = merged.graph_module.state_dict(), peft_merged.state_dict()
    adapted = {k.removeprefix("base_model.model.").replace("vera_lambda_b", "weight") for k in peft_saved if k.endswith("_b")}
    assert adapted <= set(ours_weights) & set(peft_weights)
    for name in set(ours_weights) & set(peft_weights):
        torch.testing.assert_close(ours_weights[name], peft_weights[name], rtol=1e-6, atol=1e-6)


def test_pass_inserts_tagged_branches_and_shared_projections():
    gm = capture(tiny_model("llama")).graph_module
    match_linears(gm)
    before = len(gm.graph.nodes)
    spec = lorafx.VeraSpec(r=4, targets=["q_proj", "v_proj"], dropout=0.1)
    assert insert_vera(gm, spec).counts == {"linear": 15, "vera": 4, "modules": 4}
    assert len(gm.graph.nodes) == before + 4 * 12
    assert (gm.vera_A.shape, gm.vera_B.shape) == ((4, 32), (32, 4))  # largest in, largest out of the targets
    q = gm.get_submodule("model.layers.0.self_attn.v_proj")
    assert (q.vera_lambda_b.shape, q.vera_lambda_d.shape) == ((16,), (4,))
    assert torch.count_nonzero(q.vera_lambda_b) == 0 and torch.all(q.vera_lambda_d == 0.1)
    assert isinstance(q.vera_dropout, torch.nn.Dropout) and q.vera_dropout.p == 0.1
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == [
        f"model.layers.{i}.self_attn.{m}.vera_lambda_{bd}" for i in (0, 1) for m in ("q_proj", "v_proj") for bd in "bd"
    ]


def test_starts_unchanged_and_one_step_trains_only_the_lambdas():
    model = tiny_model("gpt2")
    ids = token_batch()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    lm = lorafx.transform(model, lorafx.VeraSpec(r=4, targets=["c_attn", "mlp.c_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(lm.eval()(ids).logits, base)  # λ_b = 0
    lm.train()
    lambdas = dict(lm.named_lora_parameters())
    assert lm.trainable_parameters() == list(lambdas.values()) and len(lambdas) == 8
    before = {n: t.detach().clone() for n, t in lm.graph_module.state_dict().items()}
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
    lm(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, t in lm.graph_module.state_dict().items() if not torch.equal(t, before[n])}
    assert {n for n in lambdas if n.endswith("_b")} <= changed <= set(lambdas)  # vera_A, vera_B stay frozen
    with lm.disable_adapters(), torch.no_grad():
        torch.testing.assert_close(lm.eval()(ids).logits, base)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "VeraSpec.r=0 is invalid: allowed is an integer >= 1"),
        (dict(targets=[]), r"VeraSpec.targets=\[\] is invalid"),
        (dict(dropout=1.0), "VeraSpec.dropout=1.0 is invalid"),
        (dict(d_initial=float("nan")), "VeraSpec.d_initial=nan is invalid"),
        (dict(projection_prng_key="0"), "VeraSpec.projection_prng_key='0' is invalid"),
        (dict(save_projection=1), "VeraSpec.save_projection=1 is invalid: allowed is True or False"),
    ],
)
def test_bad_spec_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorafx.VeraSpec(**kwargs)


def test_no_matching_layer_lists_the_layers():
    with pytest.raises(NoTargetError, match=r"VeraSpec.targets=\('q_proj',\).*transformer.h.0.attn.c_attn"):
        lorafx.transform(tiny_model("gpt2"), lorafx.VeraSpec(targets=["q_proj"]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    spec = lorafx.VeraSpec(r=4, targets=["q_proj", "v_proj"], init=False)
    lm = lorafx.transform(tiny_model("llama"), spec)
    lm.save_adapter(root / "vera")
    lorafx.transform(tiny_model("llama"), lorafx.VeraSpec(r=8, targets=["q_proj", "v_proj"])).save_adapter(root / "r8")
    other_seed = lorafx.VeraSpec(r=4, targets=["q_proj", "v_proj"], projection_prng_key=1, save_projection=False)
    lorafx.transform(tiny_model("llama"), other_seed).save_adapter(root / "seed1")
    wider = lorafx.VeraSpec(r=4, targets=["q_proj", "v_proj", "up_proj"])  # vera_B (48, 4)
    lorafx.transform(tiny_model("llama"), wider).save_adapter(root / "wider")
    lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets=["q_proj"])).save_adapter(root / "lora")
    return lm, root


@pytest.mark.parametrize(
    "folder, message",
    [
        ("lora", "peft_type='LORA', but this is a VeRA model, which loads VERA adapters only"),
        ("r8", "adapter r=8 but the model was transformed with r=4"),
        ("seed1", "projection_prng_key=1 and no saved projections, but the model's vera_A / vera_B come from "
                  "projection_prng_key=0"),
        ("wider", r"base_model.vera_B has shape \(48, 4\), the model expects \(32, 4\)"),
    ],
)
def test_mismatched_adapter_is_refused_and_nothing_loaded(folders, folder, message):
    lm, root = folders
    before = {n: t.clone() for n, t in lm.graph_module.state_dict().items()}
    with pytest.raises(lorafx.AdapterError, match=message):
        lm.load_adapter(root / folder)
    assert all(torch.equal(t, before[n]) for n, t in lm.graph_module.state_dict().items())
    with pytest.raises(lorafx.AdapterError, match="named adapters are LoRA only; this model has a VeraSpec"):
        lm.load_adapter(root / "vera", name="other")


def test_vera_adapter_into_lora_or_ia3_model_is_refused(folders):
    _, root = folders
    lora = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, targets=["q_proj", "v_proj"]))
    with pytest.raises(lorafx.AdapterError, match="LORA adapters only; for this one transform with lorafx.VeraSpec"):
        lora.load_adapter(root / "vera")
    ia3 = lorafx.transform(tiny_model("llama"), lorafx.IA3Spec(targets=["q_proj", "v_proj"], feedforward=[]))
    with pytest.raises(lorafx.AdapterError, match="peft_type='VERA', but this is an \\(IA\\)³ model"):
        ia3.load_adapter(root / "vera")
