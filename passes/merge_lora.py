from __future__ import annotations

import torch

from .common import LORA, PassResult, aten, fetch_attr, weight_node
from .quantize_nf4 import STORAGE


def merge_lora(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Fold scale·B·A into each base weight and remove the LoRA subgraph and its modules.

    W ← W + scale·(B·A) (transposed for Conv1D), computed in float32 and cast back, so the
    merged graph is the original architecture again: plain aten.linear/addmm nodes only.
    """
    branches: dict[str, dict[str, torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if LORA in node.meta:
            path, role = node.meta[LORA]
            branches.setdefault(path, {}).setdefault(role, node)
    merged_nodes = removed = 0
    for path, roles in branches.items():
        owner = gm.get_submodule(path)
        scale = roles["scale"].args[1]
        delta = scale * (fetch_attr(gm, roles["B"].target).float() @ fetch_attr(gm, roles["A"].target).float())
        base = roles["add"].args[0]
        if base.target == aten.addmm.default:  # Conv1D stores W as (in, out)
            delta = delta.T
        weight = weight_node(base)
        if weight.op == "get_attr":
            with torch.no_grad():
                owner.weight.copy_((owner.weight.float() + delta).to(owner.weight.dtype))
        else:
            _unquantize(gm, owner, weight, delta)
        for name in ("lora_A", "lora_B", "lora_dropout"):
            delattr(owner, name)
    # Every LoRA branch (each call of a shared layer has one) ends in an `add` node.
    for node in list(gm.graph.nodes):
        if node.meta.get(LORA, (None, None))[1] == "add":
            node.replace_all_uses_with(node.args[0])
            merged_nodes += 1
    for node in reversed(list(gm.graph.nodes)):
        if LORA in node.meta:
            gm.graph.erase_node(node)
            removed += 1
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "get_attr" and not node.users and ".weight_nf4." in node.target:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return PassResult("merge_lora", {"modules": len(branches), "branches": merged_nodes, "nodes_removed": removed})


def _unquantize(gm, owner, dequant: torch.fx.Node, delta: torch.Tensor) -> None:
    """An NF4 base: the merged weight W + delta cannot be NF4 again without a second rounding,
    so it becomes a plain parameter in the compute dtype, read by a get_attr."""
    args = [fetch_attr(gm, a.target) if isinstance(a, torch.fx.Node) else a for a in dequant.args]
    weight = dequant.target(*args)
    owner.register_parameter(
        "weight", torch.nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
    )
    delattr(owner, STORAGE)
    with gm.graph.inserting_before(dequant):
        plain = gm.graph.get_attr(f"{dequant.args[0].target.rsplit('.', 2)[0]}.weight")
    dequant.replace_all_uses_with(plain)
    gm.graph.erase_node(dequant)
