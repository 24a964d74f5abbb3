from __future__ import annotations

import torch

from .common import (
    BRANCH_ENDS, LORA, PassResult, aten, fetch_attr, remove_tagged, tied_parameters, weight_node, weight_value, write_weight,
)
from .quantize_nf4 import STORAGE

LORA_MODULES = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")  # what insert_lora adds to a layer


def merge_lora(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Fold scale·B·A into each base weight and remove the LoRA subgraph and its modules.

    W ← W + scale·(B·A), and with DoRA W ← m ⊙ (W + scale·B·A) / ‖W + scale·B·A‖_row (as PEFT
    merges it), computed in float32 and cast back (transposed for Conv1D), so the merged graph
    is the original architecture again: plain aten.linear/addmm nodes only. A weight tied to
    another module's (GPT-2's lm_head shares the input embeddings) gets a merged weight of its own
    and the other keeps the original ("untied" counts them): folding B·A into the shared tensor
    would change the embeddings too (PEFT's merge does, and only warns).
    """
    tied, untied = tied_parameters(gm), 0
    branches: dict[str, dict[str, torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if LORA in node.meta:
            path, role = node.meta[LORA]
            branches.setdefault(path, {}).setdefault(role, node)
    for path, roles in branches.items():
        owner = gm.get_submodule(path)
        base = roles["add"].args[0]
        scale = roles["scale"].args[1]
        with torch.no_grad():
            merged = weight_value(gm, base).float() + scale * (
                fetch_attr(gm, roles["B"].target).float() @ fetch_attr(gm, roles["A"].target).float()
            )
            if "magnitude" in roles:
                magnitude = fetch_attr(gm, roles["magnitude"].target).float()
                merged = (magnitude / torch.linalg.vector_norm(merged, dim=1))[:, None] * merged
        if base.target == aten.addmm.default:  # Conv1D stores W as (in, out)
            merged = merged.T
        weight = weight_node(base)
        if weight.op == "get_attr":
            untied += write_weight(gm, base, path, merged, tied)
        else:
            _unquantize(gm, owner, weight, merged)
    for node in reversed(list(gm.graph.nodes)):  # NF4 buffers that only the replaced dequants read
        if node.op == "get_attr" and not node.users and f".{STORAGE}." in node.target:
            gm.graph.erase_node(node)
    # Every LoRA branch (each call of a shared layer has one) ends in an `add` node.
    counts = remove_tagged(gm, (LORA,), BRANCH_ENDS, LORA_MODULES)
    return PassResult(
        "merge_lora", {"modules": len(branches), "branches": counts["bypassed"], "nodes_removed": counts["nodes_removed"],
         "untied": untied}
    )


def _unquantize(gm, owner, dequant: torch.fx.Node, merged: torch.Tensor) -> None:
    """An NF4 base: the merged weight cannot be NF4 again without a second rounding, so it
    becomes a plain parameter in the compute dtype (the dequant's output dtype), read by a get_attr."""
    dtype = dequant.args[-1]
    owner.register_parameter("weight", torch.nn.Parameter(merged.to(dtype), requires_grad=False))
    delattr(owner, STORAGE)
    with gm.graph.inserting_before(dequant):
        plain = gm.graph.get_attr(f"{dequant.args[0].target.rsplit('.', 2)[0]}.weight")
    dequant.replace_all_uses_with(plain)
    gm.graph.erase_node(dequant)
