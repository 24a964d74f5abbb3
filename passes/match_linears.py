from __future__ import annotations

import torch

from .common import LINEAR, LinearSite, PassResult, aten, fetch_attr, weight_node

CONV1D = "transformers.pytorch_utils.Conv1D"


def match_linears(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Tag every linear layer whose weight is a module parameter with a LinearSite.

    Matches `aten.linear(x, W, b)` and GPT-2's Conv1D, which export writes as
    `aten.addmm(b, x, W)` with W stored (in, out) — PEFT calls that fan_in_fan_out. The
    module path comes from `nn_module_stack` and must own the weight, so a linear that a
    module computes from someone else's parameter (or from an activation) is left alone.
    """
    found = skipped = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.linear.default, aten.addmm.default):
            continue
        if LINEAR in node.meta:  # tagged by an earlier run (from_pretrained tags before loading)
            found += 1
            continue
        weight = weight_node(node)
        stack = node.meta.get("nn_module_stack") or {}
        if not stack or not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            skipped += 1
            continue
        path, module_type = list(stack.values())[-1]
        if not isinstance(module_type, str):
            module_type = f"{module_type.__module__}.{module_type.__qualname__}"
        is_conv1d = node.target == aten.addmm.default
        if weight.target != f"{path}.weight" or is_conv1d != (module_type == CONV1D):
            skipped += 1
            continue
        w = fetch_attr(gm, weight.target)
        in_f, out_f = (w.shape[0], w.shape[1]) if is_conv1d else (w.shape[1], w.shape[0])
        node.meta[LINEAR] = LinearSite(path, int(in_f), int(out_f), is_conv1d, w.dtype, w.device)
        found += 1
    return PassResult("match_linears", {"linear": found, "skipped": skipped})
