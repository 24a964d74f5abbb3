"""combine_adapters against PEFT's add_weighted_adapter."""

import copy

import peft
import pytest
import safetensors.torch
import torch
from conftest import tiny_model, token_batch

import lorafx


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_model("llama")
    peft_model = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        adapter_name="a",
    )
    torch.manual_seed(5)
    peft_model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    peft_model.save_pretrained(root)  # non-default adapters go to root/<name>/
    return model, peft_model, root / "a", root / "b"


def peft_combined(peft_model, method, weights, **kw):
    name = "m_" + "_".join([method, *map(str, kw.values())]).replace(".", "p")
    peft_model.add_weighted_adapter(["a", "b"], weights, name, combination_type=method, **kw)
    return {k: v for k, v in peft.get_peft_model_state_dict(peft_model, adapter_name=name).items()}


@pytest.mark.parametrize(
    "method, kw",
    [("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.3}),
     ("ties", {"density": 0.6, "majority_sign_method": "frequency"})],
)
def test_equals_peft_add_weighted_adapter(tmp_path, two_adapters, method, kw):
    _, peft_model, a, b = two_adapters
    weights = [0.7, -0.4]
    expected = peft_combined(peft_model, method, weights, **kw)
    out = lorafx.combine_adapters([a, b], weights, tmp_path, method=method, **kw)
    got = safetensors.torch.load_file(f"{out}/adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        if method == "svd":  # singular vectors have a sign freedom: compare B·A
            continue
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    if method == "svd":
        for key in expected:
            if key.endswith("lora_A.weight"):
                kb = key.replace("lora_A", "lora_B")
                torch.testing.assert_close(got[kb] @ got[key], expected[kb] @ expected[key], rtol=1e-4, atol=1e-5)
    config = lorafx.LoraSpec.from_peft_config(out)
    assert config.r == config.alpha == {"cat": 8}.get(method, 4)


def test_cat_is_exact_sum_and_loads(tmp_path, two_adapters):
    model, _, a, b = two_adapters
    out = lorafx.combine_adapters([a, b], [1.0, 1.0], tmp_path / "cat", method="cat")
    lm = lorafx.transform(copy.deepcopy(model), lorafx.LoraSpec.from_peft_config(out)).eval()
    lm.load_adapter(out)
    merged_cat = lm.merge()
    ids = token_batch()
    base = copy.deepcopy(model)
    expected = peft.PeftModel.from_pretrained(base, a).eval()
    expected.load_adapter(b, adapter_name="b")
    expected.base_model.set_adapter(["default", "b"])  # both active: outputs add
    with torch.no_grad():
        torch.testing.assert_close(merged_cat(ids).logits, expected(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_dare_is_seeded_and_density_one_is_linear(tmp_path, two_adapters):
    _, _, a, b = two_adapters
    load = lambda d: safetensors.torch.load_file(f"{d}/adapter_model.safetensors")  # noqa: E731
    one = load(lorafx.combine_adapters([a, b], [0.5, 0.5], tmp_path / "d1", method="dare_linear", density=0.5, seed=3))
    two = load(lorafx.combine_adapters([a, b], [0.5, 0.5], tmp_path / "d2", method="dare", density=0.5, seed=3))
    assert all(torch.equal(one[k], two[k]) for k in one)  # seeded; "dare" is "dare_linear"
    full = load(lorafx.combine_adapters([a, b], [0.5, 0.5], tmp_path / "d3", method="dare_ties", density=1.0))
    ties = load(lorafx.combine_adapters([a, b], [0.5, 0.5], tmp_path / "d4", method="ties", density=1.0))
    assert all(torch.equal(full[k], ties[k]) for k in full)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"method": "mean"}, "method='mean' is invalid"),
        ({"method": "ties"}, "needs density"),
        ({"method": "ties", "density": 1.5}, "needs density"),
        ({"weights": [1.0]}, "one weight per adapter"),
        ({"majority_sign_method": "vote"}, "majority_sign_method"),
    ],
)
def test_bad_arguments(tmp_path, two_adapters, kw, message):
    _, _, a, b = two_adapters
    args = {"adapters": [a, b], "weights": [1.0, 1.0], "out": tmp_path / "x", **kw}
    with pytest.raises(ValueError, match=message):
        lorafx.combine_adapters(**args)
    assert not (tmp_path / "x").exists()


def test_adapters_of_other_layers_combine_to_their_sum_peft_loads(tmp_path):
    """layers_to_transform [0] and [1]: the result names its layers in full, so PEFT adapts both."""
    model = tiny_model("llama")
    ids = token_batch()
    folders, deltas = [], []
    for layer in (0, 1):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[layer],
                                 init_lora_weights=False)
        source = peft.get_peft_model(copy.deepcopy(model), config)
        source.save_pretrained(tmp_path / str(layer))
        folders.append(tmp_path / str(layer))
        with torch.no_grad():
            deltas.append(source.eval()(input_ids=ids).logits)
    lorafx.combine_adapters(folders, [1.0, 1.0], tmp_path / "cat", method="cat")
    combined = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "cat").eval()
    adapted = sorted(n for n, m in combined.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert [n.split(".")[4] for n in adapted] == ["0", "1"]
    # Each source adapts another layer: both together are what lorafx gives with both loaded by name.
    lm = lorafx.transform(copy.deepcopy(model), lorafx.LoraSpec(r=8, alpha=8, targets=["q_proj"]))
    lm.load_adapter(tmp_path / "cat")
    with torch.no_grad():
        torch.testing.assert_close(combined(input_ids=ids).logits, lm.eval()(ids).logits, rtol=1e-5, atol=1e-5)
