"""(IA)³ as graph passes: insert the learned rescaling, fold it into the weights, or drop it."""

from __future__ import annotations

import torch

from .common import (
    LINEAR, PassResult, aten, fetch_attr, input_node, remove_tagged, tied_parameters, weight_value, write_weight,
)
from .insert_lora import NoTargetError

IA3 = "lorafx.ia3"  # node.meta on every node insert_ia3 adds: (module path, role)
VECTOR = "ia3_l"  # PEFT's parameter name: "<path>.ia3_l"


def insert_ia3(gm: torch.fx.GraphModule, spec) -> PassResult:
    """Rescale every linear layer `spec` (an IA3Spec) selects by a learned vector l.

    Each selected layer gets the parameter `<path>.ia3_l` (PEFT's name and shape: (out, 1) when
    it scales the output, (1, in) when the layer is a feedforward target and l scales its input),
    at ones, or N(0, 1) with init=False. The pass inserts get_attr(l) → view(-1) → mul: after
    the base node y (y ⊙ l, bias included, as PEFT) or on the base node's input (x ⊙ l, a
    feedforward layer). Conv1D (addmm) needs nothing special: its x and y are 2-D views whose
    last dim is in / out. Base weights are frozen; every inserted node is tagged
    `meta[IA3] = (path, role)` so merge_ia3 and strip_ia3 find them.
    """
    sites = [n for n in gm.graph.nodes if LINEAR in n.meta]
    paths = sorted({n.meta[LINEAR].path for n in sites})
    stray = [p for p in paths if spec.scales_input(p) and not spec.targets_layer(p)]
    if stray:
        raise ValueError(
            f"IA3Spec.feedforward={spec.feedforward!r} selects {stray[0]}, which targets={spec.targets!r} does not: "
            "feedforward modules must be a subset of the targets"
        )
    selected = [n for n in sites if spec.selects(n.meta[LINEAR].path)]
    if not selected:
        raise NoTargetError(
            f"IA3Spec.targets={spec.targets!r} (exclude={spec.exclude!r}) matches no linear layer. "
            f"Linear layers in this model: {', '.join(paths) if paths else 'none'}"
        )
    for p in gm.parameters():
        p.requires_grad_(False)
    modules, counts = set(), {"linear": len(sites), "scaled_inputs": 0, "scaled_outputs": 0}
    for node in selected:
        site = node.meta[LINEAR]
        feedforward = spec.scales_input(site.path)
        if site.path not in modules:
            shape = (1, site.in_features) if feedforward else (site.out_features, 1)
            factory = {"device": site.device, "dtype": site.dtype}
            vector = torch.ones(shape, **factory) if spec.init else torch.randn(shape, **factory)
            gm.get_submodule(site.path).register_parameter(VECTOR, torch.nn.Parameter(vector))
            modules.add(site.path)
        _insert_scale(gm, node, site.path, feedforward)
        counts["scaled_inputs" if feedforward else "scaled_outputs"] += 1
    gm.graph.lint()
    gm.recompile()
    return PassResult("insert_ia3", {**counts, "modules": len(modules)})


def _insert_scale(gm, node, path, feedforward):
    graph = gm.graph

    def add(target, args, role):
        new = graph.create_node("get_attr" if role == "vector" else "call_function", target, args)
        new.meta[IA3] = (path, role)
        if "nn_module_stack" in node.meta:  # profilers and later passes attribute it to the layer
            new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        return new

    if feedforward:
        x = input_node(node)
        with graph.inserting_before(node):
            flat = add(aten.view.default, (add(f"{path}.{VECTOR}", (), "vector"), [-1]), "flatten")
            scaled = add(aten.mul.Tensor, (x, flat), "input")
        node.replace_input_with(x, scaled)
    else:
        users = list(node.users)
        with graph.inserting_before(node.next):  # each new node lands after the previous one
            flat = add(aten.view.default, (add(f"{path}.{VECTOR}", (), "vector"), [-1]), "flatten")
            scaled = add(aten.mul.Tensor, (node, flat), "output")
        for user in users:
            user.replace_input_with(node, scaled)


def merge_ia3(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Fold each (IA)³ vector into its layer's weights, then remove the vectors (strip_ia3).

    Output scaling multiplies the rows of W (out, in) and the bias, as PEFT merges it; input
    scaling multiplies the columns. Computed in float32 and cast back; Conv1D's (in, out)
    weight is written back transposed. The merged graph is the original architecture again.
    """
    tied, untied = tied_parameters(gm), 0  # a tied lm_head gets its own merged weight (as merge_lora)
    layers: dict[str, tuple[torch.fx.Node, str]] = {}
    for node in gm.graph.nodes:
        path, role = node.meta.get(IA3, (None, None))
        if role in ("input", "output") and path not in layers:
            layers[path] = (next(iter(node.users)) if role == "input" else node.args[0], role)
    with torch.no_grad():
        for path, (base, role) in layers.items():
            vector = fetch_attr(gm, f"{path}.{VECTOR}").float()
            merged = weight_value(gm, base).float() * vector  # (out, 1) scales rows, (1, in) columns
            conv1d = base.target == aten.addmm.default
            bias = base.args[0] if conv1d else (base.args[2] if len(base.args) > 2 else None)
            untied += write_weight(gm, base, path, merged.T if conv1d else merged, tied)
            if role == "output" and isinstance(bias, torch.fx.Node):
                b = fetch_attr(gm, bias.target)
                b.copy_(b.float() * vector.flatten())
    result = strip_ia3(gm, spec)
    return PassResult("merge_ia3", {"modules": len(layers), "untied": untied, **result.counts})


def strip_ia3(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Remove every (IA)³ node and vector without folding anything: the base model's graph
    (what `disable_adapters()` runs, and merge_ia3's last step)."""
    counts = remove_tagged(gm, (IA3,), ("input", "output"), (VECTOR,))
    return PassResult("strip_ia3", {"scales": counts["bypassed"], "nodes_removed": counts["nodes_removed"]})
