"""Bad values, from the user's side: loads check the numbers inside adapters, specs and quant
states, not only their shapes; each bad one gets an error naming it, and nothing changes. Where
PEFT accepts a value, lorafx gives PEFT's result (PEFT is the oracle).

Adapter tensors (load_adapter, named adapters, checkpoints through the same reader)
  1 an integer or bool tensor                    2 a NaN or Inf tensor
  3 float32 values beyond float16's range into a float16 model    4 a float64 adapter loads, cast
  5 a NaN adapter loaded under a name: the bank is unchanged
Adapter configs (adapter_config.json)
  6 "r": "8", "target_modules": 5, "lora_alpha": "x" / NaN / Infinity / 1e39, "use_rslora": "yes",
    a rank_pattern value 0, an alpha_pattern value NaN: by load_adapter and by a named load
  7 lora_alpha 0 or negative: allowed, as PEFT allows them, with PEFT's logits
Specs
  8 LoraSpec(alpha=1e39) or inf (NaN logits before): refused, naming float32's limit
  9 from_peft_config with target_modules 5 or null (dict, LoraConfig): refused naming the field
 10 init="pissa" / "loftq" with alpha <= 0
 11 from_pretrained(dtype="banana"), and a config.json whose dtype is "banana"
Base-rewriting inits
 12 a PiSSA adapter (PEFT, saved unconverted) into a model transformed without PiSSA: refused
    (load_adapter and named); LoraModel.from_pretrained re-runs PiSSA on the base, giving PEFT's logits
 13 a plain adapter into a model transformed with init="pissa": refused
NF4 quant state
 14 NaN/Inf in absmax (no double quantization), nested_absmax, nested_quant_map, nested_offset:
    NF4Weight.from_bnb_state_dict and from_pretrained of a 4-bit folder name the layer and tensor
combine_adapters (nothing written on refusal)
 15 rsLoRA adapters: combined with scale 1, not √r (peft#3449); PEFT loads the result and gives the
    sources' logits
 16 adapters of different model sizes                17 a classifier adapter (modules_to_save)
 18 svd_rank -1, 0, 2.5 or larger than min(out, in)   19 DoRA adapters
 20 a rank_pattern adapter: the result has one rank (zero-padded), PEFT loads it with the source's logits
 21 an adapter whose config r disagrees with its tensors
diagnose
 22 a NaN adapter: AdapterError naming the tensor, and `lorafx diagnose` prints one error line
"""

import dataclasses
import json
import math
import pathlib

import peft
import pytest
import safetensors.torch
import torch
import transformers
from conftest import COMMON, tiny_model, token_batch
from test_bad_inputs import files, lora_state, unchanged

import lorafx
from lorafx.tools import cli

SPEC = lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"])
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"



def randomized(lm):
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(0, 0.1)
    return lm


@pytest.fixture(scope="module")
def llama():
    return randomized(lorafx.transform(tiny_model("llama"), SPEC))


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    llama.save_adapter(folder)
    return folder


def edited(src, dst, config=None, tensors=None):
    """A copy of the adapter folder with config fields and/or tensors replaced."""
    dst.mkdir()
    saved = safetensors.torch.load_file(src / WEIGHTS)
    saved.update(tensors or {})
    safetensors.torch.save_file(saved, dst / WEIGHTS)
    fields = json.loads((src / CONFIG).read_text())
    fields.update(config or {})
    (dst / CONFIG).write_text(json.dumps(fields))  # NaN / Infinity as Python's json writes them
    return dst


def peft_logits(model, folder):
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(model, folder).eval()(input_ids=token_batch()).logits


def logits(lm):
    with torch.no_grad():
        return lm.eval()(token_batch()).logits


# -- 1-5: adapter tensors ------------------------------------------------------------------------
@pytest.mark.parametrize("case, value, message", [
    ("int", torch.ones(4, 32, dtype=torch.int32), "is torch.int32; adapter weights must be floating point"),
    ("bool", torch.ones(4, 32, dtype=torch.bool), "is torch.bool; adapter weights must be floating point"),
    ("nan", torch.full((4, 32), float("nan")), "holds 128 NaN/Inf value"),
    ("inf", torch.zeros(4, 32).index_fill_(1, torch.tensor([3]), float("inf")), "holds 4 NaN/Inf value"),
])
def test_non_float_or_non_finite_tensor_is_refused(llama, adapter, tmp_path, case, value, message):
    folder = edited(adapter, tmp_path / case, tensors={Q_A: value})
    on_disk, before = files(folder), lora_state(llama)
    with pytest.raises(lorafx.AdapterError, match=message) as e:
        llama.load_adapter(folder)
    assert Q_A in str(e.value)
    assert unchanged(llama, before) and files(folder) == on_disk


def test_values_beyond_float16_are_refused_for_a_float16_model(tmp_path):
    # LoRA weights in float16 (PEFT's autocast_adapter_dtype=False; the default keeps them in float32)
    lm = lorafx.transform(tiny_model("llama").half(), dataclasses.replace(SPEC, autocast_adapter_dtype=False))
    big = {Q_A: torch.full((4, 32), 1e5)}
    folder = edited(_saved(lm, tmp_path / "ok"), tmp_path / "big", tensors=big)
    before = lora_state(lm)
    with pytest.raises(lorafx.AdapterError, match=r"up to 1e\+05, beyond torch.float16's range \(largest 6.55e\+04\)"):
        lm.load_adapter(folder)
    assert unchanged(lm, before)


def _saved(lm, folder):
    lm.save_adapter(folder)
    return folder


def test_float64_adapter_loads_cast_to_the_model_dtype(llama, adapter, tmp_path):
    wide = {k: v.double() for k, v in safetensors.torch.load_file(adapter / WEIGHTS).items()}
    folder = edited(adapter, tmp_path / "f64", tensors=wide)
    lm = lorafx.transform(tiny_model("llama"), SPEC)
    lm.load_adapter(folder)
    for name, p in lm.named_lora_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, wide["base_model.model." + name].float())


def test_nan_named_adapter_is_refused_and_the_bank_is_unchanged(adapter, tmp_path):
    lm = lorafx.transform(tiny_model("llama"), SPEC)
    lm.load_adapter(adapter, name="good")
    expected = logits(lm)
    folder = edited(adapter, tmp_path / "nan", tensors={Q_A: torch.full((4, 32), float("nan"))})
    with pytest.raises(lorafx.AdapterError, match="holds 128 NaN/Inf"):
        lm.load_adapter(folder, name="bad")
    assert lm.adapter_names == ["default", "good"]
    torch.testing.assert_close(logits(lm), expected, rtol=0, atol=0)


# -- 6-7: adapter configs ------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, allowed", [
    ("r", "8", "an integer >= 1"),
    ("r", 0, "an integer >= 1"),
    ("target_modules", 5, "a regex string or a list of module names"),
    ("lora_alpha", "x", "a finite number"),
    ("lora_alpha", float("nan"), "a finite number"),
    ("lora_alpha", float("inf"), "a finite number"),
    ("lora_alpha", 1e39, "float32's largest"),
    ("use_rslora", "yes", "true or false"),
    ("rank_pattern", {"q_proj": 0}, "integers >= 1"),
    ("alpha_pattern", {"q_proj": float("nan")}, "numbers"),
])
@pytest.mark.parametrize("named", [False, True])
def test_bad_config_value_is_refused_naming_field_value_and_allowed(llama, adapter, tmp_path, field, value,
                                                                     allowed, named):
    folder = edited(adapter, tmp_path / "a", config={field: value})
    lm = lorafx.transform(tiny_model("llama"), SPEC) if named else llama
    on_disk, before = files(folder), lora_state(lm)
    with pytest.raises(lorafx.AdapterError) as e:
        lm.load_adapter(folder, name="x" if named else None)
    assert f"{field}={value!r} is invalid: allowed is" in str(e.value) and allowed in str(e.value)
    assert str(folder / CONFIG) in str(e.value)
    assert unchanged(lm, before) and files(folder) == on_disk and lm.adapter_names == ["default"]


@pytest.mark.parametrize("alpha", [0, -8])
def test_zero_or_negative_lora_alpha_loads_with_peft_logits(tmp_path, alpha):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(tiny_model("llama"), config).save_pretrained(tmp_path)
    lm = lorafx.LoraModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert lm.spec.alpha == alpha
    torch.testing.assert_close(logits(lm), peft_logits(tiny_model("llama"), tmp_path), rtol=1e-5, atol=1e-5)
    named = lorafx.transform(tiny_model("llama"), SPEC)
    named.load_adapter(tmp_path, name="theirs")
    named.set_adapter("theirs")
    torch.testing.assert_close(logits(named), peft_logits(tiny_model("llama"), tmp_path), rtol=1e-5, atol=1e-5)


# -- 8-11: specs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1e39, float("inf"), -1e39])
def test_alpha_beyond_float32_is_refused(alpha):
    with pytest.raises(ValueError, match=r"LoraSpec.alpha=.* \|alpha\| <= 3.402823e\+38 \(float32's largest\)"):
        lorafx.LoraSpec(alpha=alpha)


def test_largest_allowed_alpha_gives_finite_logits_at_init():
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, alpha=3e38, targets=["q_proj"]))
    assert torch.isfinite(logits(lm)).all()  # B starts at zero: scale·0 stays 0


@pytest.mark.parametrize("targets, message", [
    (5, "target_modules=5 is invalid: allowed is a regex string or a list of module names"),
    (None, "target_modules=None: PEFT fills in per-architecture defaults"),
])
def test_from_peft_config_with_bad_target_modules(targets, message):
    with pytest.raises(lorafx.AdapterError, match=message):
        lorafx.LoraSpec.from_peft_config({"r": 4, "lora_alpha": 8, "target_modules": targets})
    if targets is None:  # PEFT's own default: LoraConfig() without targets
        with pytest.raises(lorafx.AdapterError, match="list the targets"):
            lorafx.LoraSpec.from_peft_config(peft.LoraConfig(r=4))


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_weight_init_needs_positive_alpha(init):
    with pytest.raises(ValueError, match=rf"LoraSpec.alpha=-8 is invalid: allowed is a number > 0 with init='{init}'"):
        lorafx.LoraSpec(alpha=-8, init=init, quantize="nf4" if init == "loftq" else None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama").save_pretrained(folder)
    return folder


def test_bad_dtype_names_the_allowed_dtypes(checkpoint, tmp_path):
    allowed = "allowed is a torch floating dtype or one of 'float32', 'bfloat16', 'float16', 'float64'"
    with pytest.raises(ValueError, match=f"dtype='banana' is invalid: {allowed}"):
        lorafx.from_pretrained(checkpoint, SPEC, dtype="banana", progress=False)
    with pytest.raises(ValueError, match="dtype=torch.int8 is invalid"):
        lorafx.from_pretrained(checkpoint, SPEC, dtype=torch.int8, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, data in files(checkpoint).items():
        (bad / name).write_bytes(data)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "dtype": "banana"}))
    with pytest.raises(ValueError, match=r"config.json: dtype='banana' is invalid: allowed is"):
        lorafx.from_pretrained(bad, SPEC, progress=False)
    lm = lorafx.from_pretrained(checkpoint, SPEC, dtype="bfloat16", progress=False)
    assert next(lm.graph_module.parameters()).dtype == torch.bfloat16


# -- 12-13: base-rewriting inits ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pissa_adapter(tmp_path_factory):
    """A PEFT PiSSA adapter after 'training', saved without conversion (init_lora_weights stays "pissa")."""
    folder = tmp_path_factory.mktemp("pissa")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model = peft.get_peft_model(tiny_model("llama"), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    assert json.loads((folder / CONFIG).read_text())["init_lora_weights"] == "pissa"
    return folder


@pytest.mark.parametrize("named", [False, True])
def test_pissa_adapter_into_a_plain_model_is_refused(llama, pissa_adapter, named):
    lm = lorafx.transform(tiny_model("llama"), SPEC) if named else llama
    before, weights = lora_state(lm), {n: b.clone() for n, b in lm.graph_module.state_dict().items()}
    with pytest.raises(lorafx.AdapterError) as e:
        lm.load_adapter(pissa_adapter, name="p" if named else None)
    message = str(e.value)
    assert "init_lora_weights='pissa'" in message and "init='kaiming'" in message
    assert "path_initial_model_for_weight_conversion" in message and "LoraModel.from_pretrained" in message
    assert unchanged(lm, before) and lm.adapter_names == ["default"]
    assert all(torch.equal(b, weights[n]) for n, b in lm.graph_module.state_dict().items())


def test_pissa_adapter_through_from_pretrained_gives_peft_logits(pissa_adapter):
    """PEFT's from_pretrained re-runs PiSSA on the base it is given; so does LoraModel.from_pretrained."""
    lm = lorafx.LoraModel.from_pretrained(tiny_model("llama"), pissa_adapter)
    assert lm.spec.init == "pissa"
    torch.testing.assert_close(logits(lm), peft_logits(tiny_model("llama"), pissa_adapter), rtol=1e-4, atol=1e-4)


def test_plain_adapter_into_a_pissa_model_is_refused(adapter):
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"],
                                                               init="pissa"))
    before = lora_state(lm)
    with pytest.raises(lorafx.AdapterError, match="init_lora_weights=True is an adapter for the original base"):
        lm.load_adapter(adapter)
    assert unchanged(lm, before)


# -- 14: NF4 quant state -------------------------------------------------------------------------
PREFIX = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("double_quant, tensor", [
    (False, "absmax"), (True, "nested_absmax"), (True, "nested_quant_map"), (True, "nested_offset"),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_quant_state_is_refused_naming_layer_and_tensor(double_quant, tensor, bad):
    weight = torch.randn(48, 32)
    sd = lorafx.quantize_nf4(weight, double_quant=double_quant).to_bnb_state_dict(PREFIX)
    if tensor == "nested_offset":
        state_key = f"{PREFIX}.quant_state.bitsandbytes__nf4"
        state = json.loads(bytes(sd[state_key].tolist()))
        state["nested_offset"] = bad
        sd[state_key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
        message = f"'nested_offset' is {bad!r}; expected a finite number"
    else:
        sd[f"{PREFIX}.{tensor}"] = sd[f"{PREFIX}.{tensor}"].clone().index_fill_(0, torch.tensor([0]), bad)
        message = f"NF4 weight '{PREFIX}': '{PREFIX}.{tensor}' holds NaN/Inf"
    with pytest.raises(ValueError, match=message):
        lorafx.NF4Weight.from_bnb_state_dict(sd, PREFIX)


def test_nan_nested_absmax_in_a_4bit_checkpoint_is_refused(tmp_path):
    lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, quantize="nf4")).save_quantized(tmp_path / "q")
    shard = tmp_path / "q" / "model.safetensors"
    tensors = safetensors.torch.load_file(shard)
    tensors[f"{PREFIX}.nested_absmax"] = torch.full_like(tensors[f"{PREFIX}.nested_absmax"], float("nan"))
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(lorafx.CheckpointError, match=f"'{PREFIX}.nested_absmax' holds NaN/Inf"):
        lorafx.from_pretrained(tmp_path / "q", lorafx.LoraSpec(r=4), progress=False)


# -- 15-21: combine_adapters ---------------------------------------------------------------------
def peft_adapter(folder, seed=0, model=None, **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **config}
    torch.manual_seed(seed)
    peft.get_peft_model(model or tiny_model("llama"), peft.LoraConfig(**config)).save_pretrained(folder)
    return folder


def refused(tmp_path, adapters, message, error=lorafx.AdapterError, **kw):
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        lorafx.combine_adapters(adapters, [1.0] * len(adapters), out, **kw)
    assert not out.exists()


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_rslora_adapter_combined_alone_gives_its_own_logits_in_peft(tmp_path, method):
    source = peft_adapter(tmp_path / "rs", use_rslora=True)
    out = pathlib.Path(lorafx.combine_adapters([source], [1.0], tmp_path / "out", method=method))
    assert json.loads((out / CONFIG).read_text())["use_rslora"] is False
    torch.testing.assert_close(peft_logits(tiny_model("llama"), out), peft_logits(tiny_model("llama"), source),
                               rtol=1e-4, atol=1e-5)


def test_rslora_adapters_cat_is_the_sum_peft_gives_with_both_active(tmp_path):
    a = peft_adapter(tmp_path / "a", seed=1, use_rslora=True)
    b = peft_adapter(tmp_path / "b", seed=2, r=8, lora_alpha=4, use_rslora=True)
    out = lorafx.combine_adapters([a, b], [1.0, 1.0], tmp_path / "cat", method="cat")
    both = peft.PeftModel.from_pretrained(tiny_model("llama"), a).eval()
    both.load_adapter(b, adapter_name="b")
    both.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        expected = both(input_ids=token_batch()).logits
    torch.testing.assert_close(peft_logits(tiny_model("llama"), out), expected, rtol=1e-4, atol=1e-5)


def test_adapters_of_different_model_sizes_are_refused(tmp_path):
    torch.manual_seed(0)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "hidden_size": 64}))
    a, b = peft_adapter(tmp_path / "a"), peft_adapter(tmp_path / "b", model=wide)
    refused(tmp_path, [a, b], r"self_attn.q_proj has different shapes .*32x32.*64x64.*: adapters of different models")


def test_classifier_adapter_is_refused(tmp_path):
    torch.manual_seed(0)
    classifier = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**COMMON, num_labels=3))
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(classifier, config).save_pretrained(tmp_path / "cls")
    refused(tmp_path, [tmp_path / "cls"], r"trains modules_to_save=.*score.* in full")


@pytest.mark.parametrize("svd_rank, message, error", [
    (-1, "svd_rank=-1 is invalid: allowed is None", ValueError),
    (0, "svd_rank=0 is invalid", ValueError),
    (2.5, "svd_rank=2.5 is invalid", ValueError),
    (33, r"svd_rank=33 .* is invalid for .*q_proj \(32x32\): allowed is at most min\(out, in\) = 32", ValueError),
])
def test_bad_svd_rank_is_refused_before_writing(tmp_path, svd_rank, message, error):
    a, b = peft_adapter(tmp_path / "a", seed=1), peft_adapter(tmp_path / "b", seed=2)
    refused(tmp_path, [a, b], message, error, method="svd", svd_rank=svd_rank)


def test_dora_adapters_are_refused(tmp_path):
    a = peft_adapter(tmp_path / "a", use_dora=True)
    refused(tmp_path, [a, peft_adapter(tmp_path / "b")], r"is a DoRA adapter \(use_dora=true\)")


@pytest.mark.parametrize("method", ["linear", "svd"])
def test_rank_pattern_adapter_combines_to_one_rank_peft_loads(tmp_path, method):
    source = peft_adapter(tmp_path / "rp", r=4, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 6})
    out = pathlib.Path(lorafx.combine_adapters([source], [1.0], tmp_path / "out", method=method))
    config = json.loads((out / CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 4, {})
    tensors = safetensors.torch.load_file(out / WEIGHTS)
    assert {tuple(t.shape) for k, t in tensors.items() if "lora_A" in k} == {(4, 32)}
    torch.testing.assert_close(peft_logits(tiny_model("llama"), out), peft_logits(tiny_model("llama"), source),
                               rtol=1e-4, atol=1e-5)


def test_adapter_whose_config_r_disagrees_with_its_tensors_is_refused(tmp_path):
    source = peft_adapter(tmp_path / "a")
    config = json.loads((source / CONFIG).read_text())
    (source / CONFIG).write_text(json.dumps({**config, "r": 8}))
    refused(tmp_path, [source], r"q_proj has lora_A \(4, 32\) and lora_B \(32, 4\), but adapter_config.json gives "
                                r"it r=8")


# -- 22: diagnose ----------------------------------------------------------------------------------
def test_diagnose_of_a_nan_adapter_names_the_tensor(adapter, checkpoint, tmp_path, capsys):
    folder = edited(adapter, tmp_path / "nan", tensors={Q_A: torch.full((4, 32), float("nan"))})
    with pytest.raises(lorafx.AdapterError, match=f"{Q_A} holds 128 NaN/Inf"):
        lorafx.diagnose(folder, checkpoint)
    assert cli.main(["diagnose", str(folder), "--base", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lorafx diagnose: error:" in err and "NaN/Inf" in err
    assert math.isfinite(lorafx.diagnose(adapter, checkpoint)[0].relative_norm)
