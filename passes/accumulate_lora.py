"""The LoRA branch for calls without autograd: two matrix products into the base output.

insert_lora's branch is PEFT's arithmetic: linear(x, A), linear(·, B), mul(scale), add(y, ·).
On CPU it costs ~35% of a layer that has ~3% more FLOPs, and most of that is not the FLOPs:
it is three fresh (tokens × out_features) tensors (the up product, the scaled copy, the sum),
each written and read once more, and the up product's GEMM reading Bᵀ as a transposed view
(K = r), which ran ~4× slower than the same product with a contiguous Bᵀ (one loaded 2-core
run, 1024 tokens × 1024 features, r=16). The same sum, computed as

    y2 = y.flatten(0, -2);  y2.addmm_(x2 · Aᵀ, contiguous(Bᵀ), alpha=scale)

allocates only the (tokens × r) down product and adds scale·u·Bᵀ into the base output in the
GEMM's epilogue (beta=1). addmm multiplies by alpha inside the GEMM, so the rounding differs
from PEFT's mul-then-add by an ulp of the LoRA term, far below 1e-5 relative.

This pass is not part of TRANSFORM_PASSES: LoraModel runs it on a copy of its graph (sharing
every tensor) that serves calls made with autograd off (`torch.no_grad()`, inference mode).
Training keeps insert_lora's graph, so gradients are PEFT's. It rewrites only branches where
the formulation is the same sum: plain LoRA (no DoRA term) whose LoRA weights have the layer's
dtype (no float32-on-16-bit casts); NF4 bases, dropout (the down product reads the dropout's
output, as before) and Conv1D layers (addmm, already 2-D) keep working unchanged.
"""

from __future__ import annotations

import torch

from .common import LORA, PassResult, aten


def accumulate_lora(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Rewrite each eligible LoRA branch (down → up → scale → add) into mm + in-place addmm
    on the base output (flattened to 2-D). Counts: "branches" seen, "rewritten"."""
    graph = gm.graph
    adds = [n for n in graph.nodes if n.meta.get(LORA, (None, None))[1] == "add"]
    rewritten = 0
    for add in adds:
        branch = _plain_branch(add)
        if branch is None:
            continue
        base, x, a, b, scale, dead = branch
        path = add.meta[LORA][0]

        def call(target, *args, role, **kwargs):
            node = graph.call_function(target, args, kwargs)
            node.meta[LORA] = (path, role)
            if "nn_module_stack" in add.meta:
                node.meta["nn_module_stack"] = add.meta["nn_module_stack"]
            return node

        with graph.inserting_before(add):
            down = call(aten.mm.default, call(aten.flatten.using_ints, x, 0, -2, role="flatten"),
                        call(aten.t.default, a, role="A_t"), role="down")
            up_weight = call(aten.clone.default, call(aten.t.default, b, role="B_t"),
                             memory_format=torch.contiguous_format, role="B_t")
            summed = call(aten.addmm_.default, call(aten.flatten.using_ints, base, 0, -2, role="flatten"),
                          down, up_weight, alpha=scale, role="accumulate")
            out = call(aten.view_as.default, summed, base, role="add")
        add.replace_all_uses_with(out)
        for node in [add, *dead]:  # add, scale, up, down: each now unused, in that order
            graph.erase_node(node)
        rewritten += 1
    graph.lint()
    gm.recompile()
    return PassResult("accumulate_lora", {"branches": len(adds), "rewritten": rewritten})


def _plain_branch(add: torch.fx.Node):
    """(base, x, A, B, scale, nodes to erase) if `add` ends a plain LoRA branch whose base output
    only this branch reads (so it may be summed into in place), else None."""
    base, scaled = add.args
    role = lambda node: node.meta.get(LORA, (None, None))[1] if isinstance(node, torch.fx.Node) else None  # noqa: E731
    if role(scaled) != "scale" or base.target not in (aten.linear.default, aten.addmm.default):
        return None  # DoRA ends its branch in its own term
    up, scale = scaled.args
    if role(up) != "up" or role(up.args[0]) != "down" or not isinstance(scale, (int, float)):
        return None
    down = up.args[0]
    x, a = down.args
    b = up.args[1]
    if role(x) != "dropout" or role(x.args[0]) == "cast_in" or any(role(u) == "cast_out" for u in add.users):
        return None  # float32 LoRA on a 16-bit layer: PEFT sums in float32, keep its casts
    if role(a) != "A" or role(b) != "B" or set(base.users) != {add}:
        return None
    if any(len(n.users) != 1 for n in (scaled, up, down)):
        return None
    return base, x, a, b, scale, (scaled, up, down)
