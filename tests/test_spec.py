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
