from __future__ import annotations

import torch

from .common import PassResult, aten, free_submodule_name


class AttentionDropout(torch.nn.Module):
    """scaled_dot_product_attention whose dropout applies in training only, as it did before capture."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, *args, **kwargs):
        return aten.scaled_dot_product_attention.default(
            *args, dropout_p=self.p if self.training else 0.0, **kwargs
        )


def dropout_follows_mode(gm: torch.fx.GraphModule, spec=None) -> PassResult:
    """Turn the dropouts baked into the captured graph back into modules that obey .train()/.eval().

    torch.export records `aten.dropout(x, p, train=True)` and `scaled_dot_product_attention(...,
    dropout_p=p)` as constants of the mode the model was captured in (training). Each becomes a
    `call_module` to an nn.Dropout / AttentionDropout, registered under the module that made it,
    so `LoraModel.eval()` switches them off exactly as it would on the original model.
    """
    counts = {"dropout": 0, "attention": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.dropout.default:
            x, p, train = node.args
            if not train or p == 0:
                continue
            module, kind, args, kwargs = torch.nn.Dropout(p), "dropout", (x,), {}
        elif node.target == aten.scaled_dot_product_attention.default:
            args, kwargs = node.args[:4], dict(node.kwargs)
            p = node.args[4] if len(node.args) > 4 else kwargs.pop("dropout_p", 0.0)
            if p == 0:
                continue
            module, kind = AttentionDropout(p), "attention"
            kwargs.pop("dropout_p", None)
        else:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else ""
        name = free_submodule_name(gm, f"{owner}.{kind}_in_training" if owner else f"{kind}_in_training")
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        counts[kind] += 1
    gm.recompile()
    return PassResult("dropout_follows_mode", counts)

