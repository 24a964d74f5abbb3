import pytest

from lorafx import LoraSpec


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("r", 0, ">= 1"),
        ("r", 2.5, ">= 1"),
        ("r", True, ">= 1"),
        ("alpha", 1e39, "float32's largest"),
        ("alpha", float("nan"), "finite number"),
        ("alpha", "16", "finite number"),
        ("dropout", 1.0, "0 <= dropout < 1"),
        ("dropout", -0.1, "0 <= dropout < 1"),
        ("targets", [], "non-empty"),
        ("targets", "", "regex"),
        ("targets", "q_proj(", "valid regex"),
        ("targets", ["q_proj", 3], "non-empty strings"),
        ("targets", 7, "regex string"),
        ("exclude", 3, "regex string"),
        ("use_rslora", "yes", "True or False"),
        ("init", "svd", "'kaiming'"),
        ("bias", "all", "'none'"),
        ("quantize", "int4", "None or 'nf4'"),
        ("blocksize", 48, "power of two"),
        ("blocksize", 8192, "power of two"),
        ("double_quant", 1, "True or False"),
        ("compute_dtype", "bf16", "torch.bfloat16"),
        ("quantize_skip", 5, "regex string"),
        ("use_dora", "yes", "True or False"),
        ("checkpoint", "block", "None or 'layer'"),
    ],
)
def test_invalid_field_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as e:
        LoraSpec(**{field: value})
    message = str(e.value)
    assert f"LoraSpec.{field}={value!r}" in message and allowed in message


def test_scale_plain_and_rslora():
    assert LoraSpec(r=16, alpha=32).scale == 2.0
    assert LoraSpec(r=16, alpha=32, use_rslora=True).scale == 8.0


def test_selectors_suffix_regex_and_exclude():
    spec = LoraSpec(targets=["q_proj", "mlp.up_proj"])
    assert spec.selects("model.layers.0.self_attn.q_proj")
    assert spec.selects("model.layers.0.mlp.up_proj")
    assert not spec.selects("model.layers.0.self_attn.qq_proj")
    regex = LoraSpec(targets=r".*layers\.1\..*_proj", exclude=["o_proj"])
    assert regex.selects("model.layers.1.self_attn.q_proj")
    assert not regex.selects("model.layers.0.self_attn.q_proj")
    assert not regex.selects("model.layers.1.self_attn.o_proj")


def test_from_peft_config_dict():
    spec = LoraSpec.from_peft_config(
        {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["v_proj", "q_proj"], "use_rslora": True}
    )
    assert (spec.r, spec.alpha, spec.dropout, spec.targets, spec.use_rslora) == (4, 8, 0.1, ("q_proj", "v_proj"), True)


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        (dict(layers=-1), "integer >= 0"),
        (dict(layers=[0, "1"]), "integer >= 0"),
        (dict(layers=True), "integer >= 0"),
        (dict(layers=[1], targets=r".*q_proj"), "regex targets"),
        (dict(layers_pattern="layers"), "unless layers is given"),
        (dict(layers=[0], layers_pattern="lay(ers"), "valid regexes"),
        (dict(layers=[0], layers_pattern=3), "the layer list"),
    ],
)
def test_invalid_layers_name_field_value_and_allowed(kwargs, allowed):
    field = "layers_pattern" if "layers_pattern" in kwargs else "layers"
    with pytest.raises(ValueError) as e:
        LoraSpec(**kwargs)
    assert f"LoraSpec.{field}={kwargs[field]!r}" in str(e.value) and allowed in str(e.value)


def test_layers_select_by_the_first_index_after_the_pattern():
    spec = LoraSpec(targets=["q_proj", "w1"], layers=[1])
    assert spec.selects("model.layers.1.self_attn.q_proj")
    assert not spec.selects("model.layers.0.self_attn.q_proj")
    assert not spec.selects("model.layers.0.moe.experts.1.w1")  # the layer's index, not the expert's
    assert not spec.selects("q_proj.x")  # no index in the path: not in any layer
    pattern = LoraSpec(targets=["q_proj"], layers=2, layers_pattern=["h", "layers"])
    assert pattern.selects("transformer.h.2.attn.q_proj") and pattern.selects("model.layers.2.q_proj")
    assert not pattern.selects("model.blocks.2.q_proj")
    assert LoraSpec(targets=["q_proj"], layers=[]).layers is None  # PEFT: an empty list adapts every layer


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (LoraSpec fields, the LoraConfig fields PEFT is given for the same selection)
LAYER_CASES = [
    (dict(targets=["q_proj", "v_proj"], layers=[1]), dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    (dict(targets=["v_proj"], layers=0), dict(target_modules=["v_proj"], layers_to_transform=0)),
    # PEFT refuses "all-linear" with layers_to_transform; it means its expansion to suffix names.
    (dict(targets="all-linear", layers=[0, 2]), dict(target_modules=LLAMA_LINEARS, layers_to_transform=[0, 2])),
    (
        dict(targets=["o_proj", "up_proj"], layers=[2], layers_pattern="layers"),
        dict(target_modules=["o_proj", "up_proj"], layers_to_transform=[2], layers_pattern="layers"),
    ),
    (
        dict(targets=["q_proj"], layers=[1], layers_pattern=["h", "layers"]),
        dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["h", "layers"]),
    ),
    # A full path in the targets is matched exactly, past the layer filter (as PEFT).
    (
        dict(targets=["model.layers.0.self_attn.q_proj", "v_proj"], layers=[2]),
        dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[2]),
    ),
]


@pytest.mark.parametrize("ours, theirs", LAYER_CASES)
def test_layers_select_what_peft_selects_with_its_logits_both_ways(tmp_path, ours, theirs):
    import copy
    import json

    import peft
    import torch
    import transformers
    from conftest import COMMON, token_batch

    import lorafx

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 3})).eval()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **theirs)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    peft_paths = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                        if hasattr(m, "lora_A") and "default" in m.lora_A)
    ids = token_batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits

        lm = lorafx.transform(copy.deepcopy(base), LoraSpec(r=4, alpha=8, **ours))
        assert sorted(lm.lora_paths()) == peft_paths
        assert lorafx.count_parameters(lm) == peft_model.get_nb_trainable_parameters()

        loaded = lorafx.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        assert sorted(loaded.lora_paths()) == peft_paths
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)

        lm.load_adapter(tmp_path / "peft")
        lm.save_adapter(tmp_path / "ours")
        written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert written["layers_to_transform"] == lm.spec.layers or written["layers_to_transform"] == list(lm.spec.layers)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        assert sorted(n.removeprefix("base_model.model.") for n, m in back.named_modules()
                      if hasattr(m, "lora_A") and "default" in m.lora_A) == peft_paths
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
