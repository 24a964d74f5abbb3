from __future__ import annotations

import math

import torch

from .common import LINEAR, LORA, PassResult, aten, input_node


class NoTargetError(ValueError):
    """The spec's targets select no linear layer of the model."""


def insert_lora(gm: torch.fx.GraphModule, spec) -> PassResult:
    """Add h = W0·x + scale·B·A·dropout(x) to every linear layer `spec` selects.

    For each selected LinearSite the pass registers PEFT-named submodules under the layer's
    path (`<path>.lora_A`, `<path>.lora_B`, `<path>.lora_dropout`) and inserts, after the
    base node y:  x → dropout → linear(·, A) → linear(·, B) → mul(scale) → add(y, ·).
    The same subgraph serves Conv1D (addmm): its x is already the 2-D view addmm reads.
    Base weights are frozen. Every inserted node is tagged `meta[LORA] = (path, role)` so
    merge_lora and the fuse passes find the subgraph without pattern guessing.
    """
    sites = [n for n in gm.graph.nodes if LINEAR in n.meta]
    selected = [n for n in sites if spec.selects(n.meta[LINEAR].path)]
    if not selected:
        names = sorted({n.meta[LINEAR].path for n in sites})
        raise NoTargetError(
            f"LoraSpec.targets={spec.targets!r} (exclude={spec.exclude!r}) matches no linear layer. "
            f"Linear layers in this model: {', '.join(names) if names else 'none'}"
        )
    for p in gm.parameters():
        p.requires_grad_(False)
    modules = set()
    for node in selected:
        site = node.meta[LINEAR]
        if site.path not in modules:
            _add_lora_modules(gm, site, spec)
            modules.add(site.path)
        _insert_branch(gm, node, site.path, spec)
    gm.graph.lint()
    gm.recompile()
    return PassResult("insert_lora", {"linear": len(sites), "lora": len(selected), "modules": len(modules)})


def _add_lora_modules(gm, site, spec):
    """PEFT's module names and init; LoRA weights in the dtype the layer computes in."""
    owner = gm.get_submodule(site.path)
    factory = {"device": site.device, "dtype": site.dtype}
    lora_a = torch.nn.Linear(site.in_features, spec.r, bias=False, **factory)
    lora_b = torch.nn.Linear(spec.r, site.out_features, bias=False, **factory)
    with torch.no_grad():
        if spec.init == "kaiming":
            torch.nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))  # PEFT's default init
        else:
            torch.nn.init.normal_(lora_a.weight, std=1 / spec.r)
        lora_b.weight.zero_()
    owner.add_module("lora_A", lora_a)
    owner.add_module("lora_B", lora_b)
    owner.add_module("lora_dropout", torch.nn.Dropout(spec.dropout) if spec.dropout else torch.nn.Identity())


def _insert_branch(gm, node, path, spec):
    graph = gm.graph
    users = list(node.users)

    def add(op, target, args, role):
        new = graph.create_node(op, target, args)
        new.meta[LORA] = (path, role)
        # Keep module provenance so later passes and profilers attribute the branch to the layer.
        if "nn_module_stack" in node.meta:
            new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        return new

    with graph.inserting_after(node):
        x = add("call_module", f"{path}.lora_dropout", (input_node(node),), "dropout")
    with graph.inserting_after(x):
        a = add("get_attr", f"{path}.lora_A.weight", (), "A")
    with graph.inserting_after(a):
        down = add("call_function", aten.linear.default, (x, a), "down")
    with graph.inserting_after(down):
        b = add("get_attr", f"{path}.lora_B.weight", (), "B")
    with graph.inserting_after(b):
        up = add("call_function", aten.linear.default, (down, b), "up")
    with graph.inserting_after(up):
        scaled = add("call_function", aten.mul.Tensor, (up, spec.scale), "scale")
    with graph.inserting_after(scaled):
        out = add("call_function", aten.add.Tensor, (node, scaled), "add")
    for user in users:
        user.replace_input_with(node, out)
