"""checkpoint_layers: per-decoder-layer activation checkpointing on the captured graph."""

import collections
import copy
import functools
import types

import pytest
import torch
from conftest import tiny_model, token_batch

import lorafx
from lorafx.passes.checkpoint_layers import (
    CheckpointedLayer,
    checkpoint_layers,
    graph_nodes,
    inline_checkpointed_layers,
)
from lorafx.passes.common import LINEAR, LORA


@functools.cache
def transformed(arch, quantize):
    lm = lorafx.transform(tiny_model(arch, dropout=True), lorafx.LoraSpec(r=4, alpha=8, dropout=0.1, quantize=quantize))
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(std=0.1)  # B = 0 would make every LoRA gradient but B's zero
    return lm


def lora_model(arch, quantize=None):
    """A fresh copy (each test rewrites its graph) of a transform made once per module."""
    return copy.deepcopy(transformed(arch, quantize)).train()


def loss_and_grads(lm, ids):
    torch.manual_seed(3)  # same dropout masks for both models
    loss = lm(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch, quantize", [("llama", None), ("llama", "nf4"), ("gpt2", None)])
def test_same_loss_and_gradients_bit_for_bit(arch, quantize):
    """GPT-2 has dropout in the model and in attention too: the recomputation replays the masks."""
    lm = lora_model(arch, quantize=quantize)
    plain = copy.deepcopy(lm)
    result = checkpoint_layers(lm.graph_module, None)
    assert result.counts == {"layers": 2, "nodes": result.counts["nodes"], "skipped": 0}
    assert sum(isinstance(m, CheckpointedLayer) for m in lm.modules()) == 2
    # One owner per tensor: names, state_dict and adapter keys are as before.
    assert list(lm.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in lm.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ids = token_batch(2, 9)
    loss, grads = loss_and_grads(lm, ids)
    expected_loss, expected = loss_and_grads(plain, ids)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected.keys() and len(grads) == 2 * len(lm.lora_paths())
    assert all(torch.equal(grads[n], expected[n]) for n in grads)


def test_eval_switches_off_the_dropouts_inside_the_layers():
    lm = lora_model("gpt2")
    checkpoint_layers(lm.graph_module, None)
    ids = token_batch()
    with torch.no_grad():
        assert not torch.equal(lm(ids).logits, lm(ids).logits)
        lm.eval()
        assert torch.equal(lm(ids).logits, lm(ids).logits)


def saved_bytes(lm, ids):
    """Bytes of the tensors autograd keeps for the backward during one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm(ids, labels=ids)
    return total


def test_keeps_only_layer_inputs_for_the_backward():
    lm = lora_model("llama")
    plain = copy.deepcopy(lm)
    checkpoint_layers(lm.graph_module, None)
    ids = token_batch(2, 64)
    assert saved_bytes(lm, ids) < 0.5 * saved_bytes(plain, ids)


def test_graph_nodes_sees_inside_and_inline_undoes_it(tmp_path):
    lm = lora_model("llama")
    plain = copy.deepcopy(lm)
    flat = collections.Counter((n.op, str(n.target)) for n in plain.graph_module.graph.nodes)

    def tags(nodes):
        return [(n.meta[LINEAR].path if LINEAR in n.meta else None, n.meta.get(LORA)) for n in nodes
                if LINEAR in n.meta or (LORA in n.meta and n.op != "get_attr")]  # get_attrs stay outside

    checkpoint_layers(lm.graph_module, None)
    assert tags(graph_nodes(lm.graph_module)) == tags(plain.graph_module.graph.nodes)
    assert checkpoint_layers(lm.graph_module, None).counts["layers"] == 0  # nothing left to wrap
    assert inline_checkpointed_layers(lm.graph_module).counts == {"layers": 2}
    assert collections.Counter((n.op, str(n.target)) for n in lm.graph_module.graph.nodes) == flat
    assert not any(isinstance(m, CheckpointedLayer) for m in lm.modules())
    lm.eval()
    plain.eval()
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(lm.merge()(ids).logits, plain.merge()(ids).logits)


def test_spec_without_checkpoint_is_a_no_op():
    lm = lora_model("llama")
    nodes = len(lm.graph_module.graph.nodes)
    result = checkpoint_layers(lm.graph_module, types.SimpleNamespace(checkpoint=None))
    assert result.counts == {"layers": 0, "nodes": 0, "skipped": 0}
    assert len(lm.graph_module.graph.nodes) == nodes


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x)) + x


class SharedLayer(torch.nn.Module):
    """layers.0 is called twice (weight sharing across depth)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x):
        return self.layers[0](self.layers[1](self.layers[0](x)))


def test_each_call_of_a_shared_layer_is_wrapped_on_its_own():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    lm = lorafx.transform(SharedLayer(), lorafx.LoraSpec(r=2, alpha=2), example_args=(x,))
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_()
    plain = copy.deepcopy(lm)
    assert checkpoint_layers(lm.graph_module, None).counts == {"layers": 3, "nodes": 24, "skipped": 0}
    assert lm.graph_module.get_submodule("layers.0.checkpointed1")
    lm(x).sum().backward()
    plain(x).sum().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(lm.trainable_parameters(), plain.trainable_parameters()))


def test_a_layer_interleaved_with_nodes_that_read_it_is_skipped():
    class Tangled(torch.nn.Module):
        def forward(self, x):
            a = x + 1
            b = a * 2  # outside the layer, between its nodes, reading one of them
            return a + b

    gm = torch.fx.symbolic_trace(Tangled())
    first, _, last = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in (first, last):
        node.meta["nn_module_stack"] = {"layers.0": ("layers.0", "Block")}
    assert checkpoint_layers(gm, None).counts == {"layers": 0, "nodes": 0, "skipped": 1}
    assert torch.equal(gm(torch.ones(2)), torch.full((2,), 6.0))


def test_spec_checkpoint_layer_through_transform_save_and_merge(tmp_path):
    """checkpoint="layer" in the spec: the pipeline wraps the layers, and adapters, merge and
    export still see every LoRA layer (they read the flat view of the graph)."""
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, alpha=8, checkpoint="layer")).eval()
    assert next(r for r in lm.pass_results if r.name == "checkpoint_layers").counts["layers"] == 2
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(std=0.05)
    lm.save_adapter(tmp_path)
    assert len(lm.lora_paths()) == 14
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(lm.merge()(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)
