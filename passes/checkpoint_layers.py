"""Activation (gradient) checkpointing per decoder layer, on the captured graph.

A captured model is one flat graph, so there is no `layer.forward` to hand to
torch.utils.checkpoint as Hugging Face does. `checkpoint_layers` cuts the graph along the
decoder layers instead: each layer's nodes move into a GraphModule `body`, called from the
outer graph through a CheckpointedLayer module. Autograd then keeps only each layer's inputs
during the forward and recomputes the layer in the backward.

What stays outside the bodies, so that parameters and buffers have one owner and one name:
every `get_attr` (weights, LoRA A/B, NF4 buffers) stays in the outer graph and is passed to
the body as an input. The body owns no parameters or buffers: state_dict, named_parameters,
.to() and PEFT adapter names are the same with and without checkpointing. The only modules a
body calls are the outer graph's own parameter-free ones (dropouts), so .train()/.eval()
still reach them.

The nodes keep their meta in the bodies: `graph_nodes(gm)` walks the outer graph with each
body in place, and `inline_checkpointed_layers` undoes the pass (merge and export want one
flat graph).
"""

from __future__ import annotations

import operator
from typing import Iterator

import torch
import torch.utils.checkpoint

from .common import PassResult, free_submodule_name

WRAPPER = "checkpointed"  # the CheckpointedLayer of "model.layers.3" is "model.layers.3.checkpointed"


class CheckpointedLayer(torch.nn.Module):
    """Runs `body` (one decoder layer's subgraph) under non-reentrant torch.utils.checkpoint.

    Non-reentrant, the variant PyTorch recommends (the reentrant one needs an input that
    requires grad and does not support torch.autograd.grad). The RNG state is preserved (the
    default), so dropout masks in the recomputation equal the forward's and gradients are exact.
    """

    def __init__(self, body: torch.fx.GraphModule):
        super().__init__()
        self.body = body

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.body, *args, use_reentrant=False)


def checkpoint_layers(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Wrap each decoder layer's subgraph in a CheckpointedLayer (see the module docstring).

    A decoder layer is the outermost module in a node's `nn_module_stack` whose path ends in
    an index: "model.layers.3" (Llama), "transformer.h.3" (GPT-2). Each call of a layer is
    wrapped on its own (a layer shared by weight tying is called more than once; the stack
    tells the calls apart). A call whose nodes are interleaved with outside nodes that read
    them cannot be cut out without reordering the graph; it is left as it is and counted as
    skipped. With a spec, the pass runs only when `spec.checkpoint == "layer"`; with None it
    always runs.
    """
    if spec is not None and spec.checkpoint != "layer":
        return PassResult("checkpoint_layers", {"layers": 0, "nodes": 0, "skipped": 0})
    calls: dict[str, tuple[str, list[torch.fx.Node]]] = {}
    for node in gm.graph.nodes:
        layer = _layer_call(node) if node.op in ("call_function", "call_module", "call_method") else None
        if layer is None:
            continue
        call, path = layer
        # A module the layer does not own (export's input guard `_guards_fn`) stays outside.
        if node.op != "call_module" or node.target.startswith(path + "."):
            calls.setdefault(call, (path, []))[1].append(node)
    counts = {"layers": 0, "nodes": 0, "skipped": 0}
    for path, nodes in calls.values():
        if _interleaved(nodes):
            counts["skipped"] += 1
            continue
        _wrap(gm, path, nodes)
        counts["layers"] += 1
        counts["nodes"] += len(nodes)
    gm.graph.lint()
    gm.recompile()
    return PassResult("checkpoint_layers", counts)


def _layer_call(node: torch.fx.Node) -> tuple[str, str] | None:
    """(the stack's key for this call of the layer, the layer's module path), or None."""
    for call, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        if path.rpartition(".")[2].isdigit():
            return call, path
    return None


def _interleaved(nodes: list[torch.fx.Node]) -> bool:
    """True when a node between the layer's first and last node, outside the layer, reads
    one of the layer's nodes: the body call (placed at the layer's end) would come after it."""
    inside = set(nodes)
    node = nodes[0]
    while node is not nodes[-1]:
        if node not in inside and node.op != "get_attr" and any(a in inside for a in node.all_input_nodes):
            return True
        node = node.next
    return False


def _wrap(gm: torch.fx.GraphModule, path: str, nodes: list[torch.fx.Node]) -> None:
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]

    body = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in inputs:
        env[node] = body.placeholder(node.name)
        if "val" in node.meta:
            env[node].meta["val"] = node.meta["val"]
    for node in nodes:
        env[node] = body.node_copy(node, env.__getitem__)
    body.output(tuple(env[n] for n in outputs))
    name = free_submodule_name(gm, f"{path}.{WRAPPER}")  # numbered for a shared layer's second call
    # root=gm: the body's call_module targets (dropouts) resolve to gm's own module objects.
    gm.add_submodule(name, CheckpointedLayer(torch.fx.GraphModule(gm, body)))

    graph = gm.graph
    with graph.inserting_after(nodes[-1]):
        call = graph.call_module(name, tuple(inputs))
    last = call
    for i, node in enumerate(outputs):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (call, i))
        if "val" in node.meta:
            last.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(last, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        graph.erase_node(node)



def graph_nodes(gm: torch.fx.GraphModule) -> Iterator[torch.fx.Node]:
    """The nodes of the flat graph, in execution order: each checkpointed layer's body nodes
    in place of its call and output getitems. What a reader of node.meta (LINEAR, LORA) wants."""
    calls = set()
    for node in gm.graph.nodes:
        wrapper = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(wrapper, CheckpointedLayer):
            calls.add(node)
            yield from (n for n in wrapper.body.graph.nodes if n.op not in ("placeholder", "output"))
        elif not (node.target is operator.getitem and node.args[0] in calls):  # a body's output
            yield node


def inline_checkpointed_layers(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Undo checkpoint_layers: put each body's nodes back into the outer graph, in place of
    the call, and remove the CheckpointedLayer modules. The result is the flat graph again."""
    graph = gm.graph
    inlined = 0
    for call in list(graph.nodes):
        if call.op != "call_module" or not isinstance(gm.get_submodule(call.target), CheckpointedLayer):
            continue
        body = gm.get_submodule(call.target).body.graph
        placeholders = [n for n in body.nodes if n.op == "placeholder"]
        env = dict(zip(placeholders, call.args))
        with graph.inserting_before(call):
            for node in body.nodes:
                if node.op not in ("placeholder", "output"):
                    env[node] = graph.node_copy(node, env.__getitem__)
        outputs = body.output_node().args[0]
        for getitem in list(call.users):
            getitem.replace_all_uses_with(env[outputs[getitem.args[1]]])
            graph.erase_node(getitem)
        graph.erase_node(call)
        gm.delete_submodule(call.target)
        inlined += 1
    graph.lint()
    gm.recompile()
    return PassResult("inline_checkpointed_layers", {"layers": inlined})
