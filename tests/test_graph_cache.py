"""A second capture of an equal model reuses the first one's graph over its own tensors; models
that differ in anything the graph depends on do not (lorafx/core/graph_cache.py)."""

import torch
import transformers

import lorafx
from conftest import CONFIGS, token_batch, tiny_model
from lorafx.core import capture as capture_module
from lorafx.core import graph_cache

SPEC = lorafx.LoraSpec(r=4, alpha=8)


def lora_outputs(lm):
    ids = token_batch(batch=3, seq=6)
    return lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_second_transform_is_cached_and_identical():
    graph_cache.clear()
    first = lorafx.transform(tiny_model("llama", seed=0), SPEC)
    second_model = tiny_model("llama", seed=1)  # other weights, same architecture
    torch.manual_seed(5)
    hits = graph_cache.stats["hits"]
    second = lorafx.transform(second_model, SPEC)
    assert graph_cache.stats["hits"] == hits + 1
    graph_cache.clear()
    uncached_model = tiny_model("llama", seed=1)
    torch.manual_seed(5)  # the same LoRA init as `second` got
    uncached = lorafx.transform(uncached_model, SPEC)
    assert graph_cache.stats["hits"] == hits + 1
    with torch.no_grad():
        for (name, a), (_, b) in zip(second.state_dict().items(), uncached.state_dict().items()):
            assert torch.equal(a, b), name
        assert torch.equal(lora_outputs(second), lora_outputs(uncached))
    # no tensor of one model is reachable from the other's graph
    storage = lambda lm: {t.untyped_storage().data_ptr() for t in lm.graph_module.state_dict().values() if t.numel()}
    assert not storage(first) & storage(second)
    for name, p in second.graph_module.named_parameters():
        if "lora_" not in name:
            assert p is second_model.get_parameter(name)
    assert str(second.graph_module.code) == str(uncached.graph_module.code)


def capture_cached(model, **kwargs):
    return capture_module.capture(model, **kwargs).cached


def test_differing_models_miss():
    graph_cache.clear()
    assert not capture_cached(tiny_model("llama"))
    assert capture_cached(tiny_model("llama", seed=3))
    config = CONFIGS["llama"]()
    config.rms_norm_eps = 1e-3  # a config field the graph reads
    assert not capture_cached(transformers.AutoModelForCausalLM.from_config(config))
    other = tiny_model("llama")
    other.model.layers[1].self_attn.scaling = 0.25  # instance state
    assert not capture_cached(other)
    assert not capture_cached(tiny_model("qwen2"))
    assert not capture_cached(tiny_model("llama").to(torch.float64))  # dtypes
    ids = torch.zeros(2, 8, dtype=torch.long)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert not capture_cached(tiny_model("llama"), example_kwargs=inputs)  # other example inputs...
    assert capture_cached(tiny_model("llama"), example_kwargs={k: v + 1 for k, v in inputs.items()})  # ...values aside


def test_patched_model_code_misses(monkeypatch):
    from transformers.models.llama import modeling_llama

    graph_cache.clear()
    model = tiny_model("llama")
    ids = token_batch()
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    expected = capture_module.capture(model).graph_module(**inputs)["logits"]
    original = modeling_llama.rotate_half
    monkeypatch.setattr(modeling_llama, "rotate_half", lambda x: original(x) * 2)  # as kernel libraries patch
    patched = capture_module.capture(model)
    assert not patched.cached
    assert not torch.equal(patched.graph_module(**inputs)["logits"], expected)


def test_cached_graph_survives_the_first_models_passes():
    """The passes rewrite the first graph in place (LoRA nodes, NF4): the cached copy stays the capture."""
    graph_cache.clear()
    lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, quantize="nf4"))
    captured = capture_module.capture(tiny_model("llama", seed=2))
    assert captured.cached
    assert not any("lora" in str(n.target) or "nf4" in str(n.target) for n in captured.graph_module.graph.nodes)
    model = tiny_model("llama", seed=2)
    ids = token_batch()
    torch.testing.assert_close(captured.graph_module(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"],
                               model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
