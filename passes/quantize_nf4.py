from __future__ import annotations

import dataclasses

import torch

from lorafx.formats.nf4 import TENSOR_FIELDS, NF4Weight, quantize_nf4 as quantize_tensor

from .common import LINEAR, PassResult, aten, input_node, weight_node

STORAGE = "weight_nf4"  # owner.<STORAGE> holds the NF4 tensors in place of owner.weight


class NF4Storage(torch.nn.Module):
    """The tensors of one NF4Weight as buffers, so they move with .to() and sit in state_dict."""

    def __init__(self, weight: NF4Weight):
        super().__init__()
        for name in TENSOR_FIELDS:
            self.register_buffer(name, getattr(weight, name))
        self.blocksize, self.shape, self.dtype = weight.blocksize, tuple(weight.shape), weight.dtype

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(
            **{name: getattr(self, name) for name in TENSOR_FIELDS},
            blocksize=self.blocksize,
            shape=self.shape,
            dtype=self.dtype,
        )

    def extra_repr(self):
        return f"shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}"


def install_nf4(owner: torch.nn.Module, weight: NF4Weight) -> None:
    """Give `owner` NF4 storage and free its full-precision weight.

    The Parameter is shared with the model given to transform(); emptying its data (rather
    than only dropping our reference) is what actually returns the memory, at the price
    that the original model can no longer run — as with PEFT, transform consumes it.
    """
    owner.add_module(STORAGE, NF4Storage(weight))
    old = owner._parameters.pop("weight", None)
    if old is not None:
        old.data = torch.empty(0, dtype=old.dtype, device=old.device)


def quantize_nf4(gm: torch.fx.GraphModule, spec) -> PassResult:
    """Store each linear weight `spec.quantizes` as NF4 and dequantize it in the graph.

    The weight's `get_attr` becomes `lorafx::nf4_dequant(<NF4 buffers>, ...)` — one opaque
    node, which the fuse passes and torch.export see as such — feeding an `aten.linear`.
    A Conv1D (addmm, W stored (in, out)) is quantized as Wᵀ, the (out, in) layout
    transformers gives bitsandbytes, and becomes a linear. Weights already in NF4 storage
    (loaded from a 4-bit checkpoint) are used as they are. When the compute dtype differs
    from the activations' dtype, x is cast in and the output cast back, as bitsandbytes'
    Linear4bit does.
    """
    if spec.quantize != "nf4":
        return PassResult("quantize_nf4", {"quantized": 0, "loaded": 0, "skipped": 0})
    counts = {"quantized": 0, "loaded": 0, "skipped": 0}
    graph = gm.graph
    for node in list(graph.nodes):
        site = node.meta.get(LINEAR)
        if site is None:
            continue
        if not spec.quantizes(site.path):
            counts["skipped"] += 1
            continue
        owner = gm.get_submodule(site.path)
        if not hasattr(owner, STORAGE):
            _refuse_tied(gm, node, site)
            weight = owner.weight.detach()
            try:
                nf4 = quantize_tensor(weight.T if site.fan_in_fan_out else weight, spec.blocksize, spec.double_quant)
            except ValueError as e:
                raise ValueError(f"{site.path}.weight: {e}") from e
            install_nf4(owner, nf4)
            counts["quantized"] += 1
        else:
            counts["loaded"] += 1
        act_dtype = site.dtype
        compute = spec.compute_dtype or (torch.bfloat16 if site.device.type == "cuda" else act_dtype)
        old_weight = weight_node(node)
        x = input_node(node)
        bias = node.args[0] if node.target == aten.addmm.default else (node.args[2] if len(node.args) > 2 else None)
        storage = owner.get_submodule(STORAGE)
        with graph.inserting_before(node):
            buffers = [
                graph.get_attr(f"{site.path}.{STORAGE}.{name}") if getattr(storage, name) is not None else None
                for name in TENSOR_FIELDS
            ]
            deq = graph.call_function(
                torch.ops.lorafx.nf4_dequant.default,
                (*buffers, storage.blocksize, [site.out_features, site.in_features], compute),
            )
            if compute != act_dtype:
                x = graph.call_function(aten._to_copy.default, (x,), {"dtype": compute})
                if bias is not None:
                    bias = graph.call_function(aten._to_copy.default, (bias,), {"dtype": compute})
            linear = graph.call_function(aten.linear.default, (x, deq, bias) if bias is not None else (x, deq))
        linear.meta = {k: v for k, v in node.meta.items() if k != "val"}
        linear.meta[LINEAR] = dataclasses.replace(site, dtype=compute)
        out = linear
        if compute != act_dtype:
            with graph.inserting_after(linear):
                out = graph.call_function(aten._to_copy.default, (linear,), {"dtype": act_dtype})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if not old_weight.users:
            graph.erase_node(old_weight)
    graph.lint()
    gm.recompile()
    return PassResult("quantize_nf4", counts)


def _refuse_tied(gm, node, site) -> None:
    """A weight something else also reads (GPT-2's lm_head is its token embedding) cannot move
    to NF4 storage without untying it: say so, instead of a broken graph."""
    owner = gm.get_submodule(site.path)
    names = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is owner.weight]
    readers = [u.name for u in weight_node(node).users if u is not node]
    if len(names) > 1 or readers:
        also = ", ".join(n for n in names if n != f"{site.path}.weight") or ", ".join(readers)
        raise ValueError(
            f"{site.path}.weight is tied ({also} reads it too): NF4 storage would untie it. Keep it full "
            f"precision: leave {site.path!r} in LoraSpec.quantize_skip (its default skips the output head)"
        )
