"""VeRA as graph passes: insert the shared-projection branch, fold it into the weights, or drop it."""

from __future__ import annotations

import math

import torch

from .common import (
    LINEAR, PassResult, aten, fetch_attr, input_node, remove_tagged, tied_parameters, weight_value, write_weight,
)
from .insert_lora import NoTargetError

VERA = "lorafx.vera"  # node.meta on every node insert_vera adds: (module path, role)
PROJECTIONS = ("vera_A", "vera_B")  # graph-module buffers shared by every layer (PEFT: base_model.vera_A / _B)
LAYER_NAMES = ("vera_lambda_b", "vera_lambda_d", "vera_dropout")  # under each layer's path, PEFT's names


def insert_vera(gm: torch.fx.GraphModule, spec) -> PassResult:
    """Add y + λ_b ⊙ (B_s · (λ_d ⊙ (A_s · dropout(x)))) to every linear layer `spec` (a VeraSpec) selects.

    One pair of frozen buffers serves all layers: `vera_A` (r, largest in) and `vera_B` (largest
    out, r), drawn as PEFT draws them (kaiming-uniform, fan-in, gain √2, A then B from one CPU
    generator seeded with projection_prng_key). Each selected layer gets the trainable
    `<path>.vera_lambda_d` (r,) and `<path>.vera_lambda_b` (out,) and `<path>.vera_dropout`; the
    branch x → dropout → linear(·, A[:, :in]) → ·λ_d → linear(·, B[:out]) → ·λ_b → add(y, ·) is
    the same for Conv1D (addmm), whose x is already the 2-D view it reads. Base weights are
    frozen; inserted nodes are tagged `meta[VERA] = (path, role)` for merge_vera and strip_vera.
    """
    sites = [n for n in gm.graph.nodes if LINEAR in n.meta]
    selected = [n for n in sites if spec.selects(n.meta[LINEAR].path)]
    if not selected:
        names = sorted({n.meta[LINEAR].path for n in sites})
        raise NoTargetError(
            f"VeraSpec.targets={spec.targets!r} (exclude={spec.exclude!r}) matches no linear layer. "
            f"Linear layers in this model: {', '.join(names) if names else 'none'}"
        )
    for p in gm.parameters():
        p.requires_grad_(False)
    first = selected[0].meta[LINEAR]
    largest_in = max(n.meta[LINEAR].in_features for n in selected)
    largest_out = max(n.meta[LINEAR].out_features for n in selected)
    generator = torch.Generator(device="cpu").manual_seed(spec.projection_prng_key)
    for name, shape in zip(PROJECTIONS, ((spec.r, largest_in), (largest_out, spec.r))):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])  # kaiming-uniform over fan-in = shape[1]
        projection = torch.empty(shape).uniform_(-bound, bound, generator=generator)
        gm.register_buffer(name, projection.to(device=first.device, dtype=first.dtype))
    modules = set()
    for node in selected:
        site = node.meta[LINEAR]
        if site.path not in modules:
            _add_vera_modules(gm.get_submodule(site.path), site, spec)
            modules.add(site.path)
        _insert_branch(gm, node, site)
    gm.graph.lint()
    gm.recompile()
    return PassResult("insert_vera", {"linear": len(sites), "vera": len(selected), "modules": len(modules)})


def _add_vera_modules(owner, site, spec):
    factory = {"device": site.device, "dtype": site.dtype}
    if spec.init:  # PEFT's init: the branch starts at zero
        lambda_b, lambda_d = torch.zeros(site.out_features, **factory), torch.full((spec.r,), spec.d_initial, **factory)
    else:
        lambda_b, lambda_d = torch.ones(site.out_features, **factory), torch.randn(spec.r, **factory)
    owner.register_parameter("vera_lambda_b", torch.nn.Parameter(lambda_b))
    owner.register_parameter("vera_lambda_d", torch.nn.Parameter(lambda_d))
    owner.add_module("vera_dropout", torch.nn.Dropout(spec.dropout) if spec.dropout else torch.nn.Identity())


def _insert_branch(gm, node, site):
    graph, path = gm.graph, site.path
    users = list(node.users)

    def add(op, target, args, role):
        new = graph.create_node(op, target, args)
        new.meta[VERA] = (path, role)
        if "nn_module_stack" in node.meta:  # profilers and later passes attribute it to the layer
            new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        return new

    call = lambda target, args, role: add("call_function", target, args, role)  # noqa: E731
    with graph.inserting_before(node.next):  # each new node lands after the previous one
        x = add("call_module", f"{path}.vera_dropout", (input_node(node),), "dropout")
        a = call(aten.slice.Tensor, (add("get_attr", "vera_A", (), "A"), 1, 0, site.in_features), "A_slice")
        down = call(aten.linear.default, (x, a), "down")
        lambda_d = add("get_attr", f"{path}.vera_lambda_d", (), "lambda_d")
        scaled_down = call(aten.mul.Tensor, (down, lambda_d), "scale_d")
        b = call(aten.slice.Tensor, (add("get_attr", "vera_B", (), "B"), 0, 0, site.out_features), "B_slice")
        up = call(aten.linear.default, (scaled_down, b), "up")
        lambda_b = add("get_attr", f"{path}.vera_lambda_b", (), "lambda_b")
        scaled_up = call(aten.mul.Tensor, (up, lambda_b), "scale_b")
        out = call(aten.add.Tensor, (node, scaled_up), "add")
    for user in users:
        user.replace_input_with(node, out)


def merge_vera(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Fold ΔW = (λ_b ⊙ B_s)·(λ_d ⊙ A_s) into each layer's weight, then remove the branches (strip_vera).

    Computed in float32 and cast back, transposed for Conv1D's (in, out) weight, as PEFT merges it.
    """
    tied, untied = tied_parameters(gm), 0  # a tied lm_head gets its own merged weight (as merge_lora)
    bases: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        path, role = node.meta.get(VERA, (None, None))
        if role == "add":
            bases.setdefault(path, node.args[0])
    projection_a, projection_b = (fetch_attr(gm, name).float() for name in PROJECTIONS)
    with torch.no_grad():
        for path, base in bases.items():
            site = base.meta[LINEAR]
            lambda_b, lambda_d = (fetch_attr(gm, f"{path}.{name}").float() for name in LAYER_NAMES[:2])
            delta = (lambda_b[:, None] * projection_b[: site.out_features]) @ (
                lambda_d[:, None] * projection_a[:, : site.in_features]
            )
            merged = weight_value(gm, base).float() + delta
            untied += write_weight(gm, base, path, merged.T if base.target == aten.addmm.default else merged, tied)
    result = strip_vera(gm, spec)
    return PassResult("merge_vera", {"modules": len(bases), "untied": untied, **result.counts})


def strip_vera(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Remove every VeRA branch, its per-layer modules and the shared projections, folding nothing:
    the base model's graph (what `disable_adapters()` runs, and merge_vera's last step)."""
    counts = remove_tagged(gm, (VERA,), ("add",), LAYER_NAMES)
    for name in PROJECTIONS:
        if name in gm._buffers:
            del gm._buffers[name]
    return PassResult("strip_vera", {"branches": counts["bypassed"], "nodes_removed": counts["nodes_removed"]})
