"""Capture traces one decoder layer per kind and stamps the repeats: the graph must be the one
a full trace records (lorafx/core/repeated_layers.py)."""

import collections

import pytest
import torch
import transformers

from conftest import CONFIGS, token_batch
from lorafx.core import capture as capture_module
from lorafx.core import graph_cache
from lorafx.core.repeated_layers import repeated_layers


def deep_model(arch, layers=3, seed=0):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * layers
    for field in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):  # deterministic outputs
        if hasattr(config, field):
            setattr(config, field, 0.0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def full_capture(model, monkeypatch, *args, **kwargs):
    """capture() with stamping off: every layer traced."""
    with monkeypatch.context() as m:
        m.setattr(capture_module, "repeated_layers", lambda model: {})
        graph_cache.clear()
        return capture_module.capture(model, *args, **kwargs)


def signature(gm):
    """The graph's ops and the module each node came from, as multisets."""
    ops = collections.Counter((n.op, str(n.target)) for n in gm.graph.nodes)
    stacks = collections.Counter(
        tuple(path for path, _ in n.meta["nn_module_stack"].values()) for n in gm.graph.nodes
        if n.meta.get("nn_module_stack")
    )
    return ops, stacks


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_stamped_graph_is_the_full_trace(arch, monkeypatch):
    model = deep_model(arch)
    graph_cache.clear()
    stamped = capture_module.capture(model)
    full = full_capture(model, monkeypatch)
    assert stamped.stamped_layers == 2 and full.stamped_layers == 0
    assert signature(stamped.graph_module) == signature(full.graph_module)
    # the very parameters of the model, as export binds them
    for name, p in stamped.graph_module.named_parameters():
        assert p is model.get_parameter(name)
    assert sorted(n for n, _ in stamped.graph_module.named_parameters()) == \
        sorted(n for n, _ in full.graph_module.named_parameters())
    ids = token_batch(batch=3, seq=5)  # other sizes than the example: the dims stayed symbolic
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    ours, theirs = stamped.graph_module(**kwargs)["logits"], full.graph_module(**kwargs)["logits"]
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(ours, model(**kwargs).logits, rtol=1e-5, atol=1e-5)


def test_layers_with_other_state_are_not_repeats():
    model = deep_model("llama")
    model.model.layers[2].self_attn.scaling = 0.5  # a per-layer rule the trace reads
    assert repeated_layers(model) == {"model.layers.1": "model.layers.0"}


class Block(torch.nn.Module):
    def __init__(self, layer_idx, reads_index):
        super().__init__()
        self.layer_idx, self.reads_index = layer_idx, reads_index
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        if self.reads_index:  # a per-layer rule at call time: stamping must refuse
            return self.linear(x) * (self.layer_idx + 1)
        return self.linear(x)


class Stack(torch.nn.Module):
    def __init__(self, reads_index, layers=3):
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)  # the layers' inputs require grad alike
        self.layers = torch.nn.ModuleList(Block(i, reads_index) for i in range(layers))

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("reads_index", [False, True])
def test_plain_module_stack(reads_index):
    torch.manual_seed(0)
    model = Stack(reads_index)
    x = torch.randn(4, 8)
    graph_cache.clear()
    captured = capture_module.capture(model, example_args=(x,))
    # a layer whose trace reads layer_idx is traced for itself, and the graph is still exact
    assert captured.stamped_layers == (0 if reads_index else 2)
    y = torch.randn(6, 8)
    torch.testing.assert_close(captured.graph_module(y), model(y), rtol=0, atol=0)


def test_layers_given_an_object_are_traced():
    """Layers called with an object (as decode graphs pass a KV cache) are all traced for themselves."""

    class Cache:
        scale = 2.0

    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(CacheBlock() for _ in range(3))

        def forward(self, x):
            cache = Cache()
            for layer in self.layers:
                x = layer(x, cache)
            return x

    class CacheBlock(torch.nn.Linear):
        def __init__(self):
            super().__init__(8, 8)

        def forward(self, x, cache):
            return super().forward(x) * cache.scale

    torch.manual_seed(0)
    model = Cached()
    graph_cache.clear()
    captured = capture_module.capture(model, example_args=(torch.randn(4, 8),))
    assert captured.stamped_layers == 0
    y = torch.randn(5, 8)
    torch.testing.assert_close(captured.graph_module(y), model(y), rtol=0, atol=0)


def test_layer_called_otherwise_is_traced():
    """A repeat called with inputs of another shape than its representative is traced for itself."""

    class Widening(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
            self.scale = torch.nn.Parameter(torch.ones(8))  # the layers' inputs require grad alike

        def forward(self, x):
            x = self.layers[0](x * self.scale)
            x = self.layers[1](x.unsqueeze(0)).squeeze(0)  # a 3-D input: not its representative's call
            return self.layers[2](x)

    torch.manual_seed(0)
    model = Widening()
    graph_cache.clear()
    captured = capture_module.capture(model, example_args=(torch.randn(4, 8),))
    assert captured.stamped_layers == 1  # layers.2 repeats layers.0's call; layers.1 is traced
    y = torch.randn(5, 8)
    torch.testing.assert_close(captured.graph_module(y), model(y), rtol=0, atol=0)


def test_nested_repeats_stamp_the_outer_layers():
    """Lists inside repeated layers (experts inside decoder layers) are not stamped a second time:
    a copy of layer 0 must read layer 1's experts, not layer 0's."""

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

        def forward(self, x):
            for expert in self.experts:
                x = expert(x)
            return x

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(8, 8)
            self.layers = torch.nn.ModuleList(Experts() for _ in range(2))

        def forward(self, x):
            x = self.embed(x)
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = Outer()
    assert repeated_layers(model) == {"layers.1": "layers.0"}
    graph_cache.clear()
    captured = capture_module.capture(model, example_args=(torch.randn(4, 8),))
    assert captured.stamped_layers == 1
    y = torch.randn(3, 8)
    torch.testing.assert_close(captured.graph_module(y), model(y), rtol=0, atol=0)
