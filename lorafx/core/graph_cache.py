"""Captured graphs kept for the next capture of a model that traces to the same graph.

torch.export's graph depends on the model's code and non-tensor state, its tensors' shapes,
dtypes and devices (never their values: export traces fake tensors), the example inputs'
metadata and the dynamic shapes asked for. Two models equal in all of that — a second
`lorafx.transform` of the same architecture and config — get the same graph, so the second
capture copies the first one's graph and binds it to its own parameters and buffers by name.
No tensor of one model is ever reachable from another's graph: model tensors are looked up
in the model being captured, and the graph's own constants are cloned.

The key holds, besides the model's state (lorafx/core/repeated_layers.py `layer_state`), the
identity of every function in the modules that define the model's classes, so patching
them (Liger-style kernels replacing `apply_rotary_pos_emb`) misses the cache; so does any
attribute that is an object compared by identity (a per-instance bound method, say).
"""

from __future__ import annotations

import collections
import copy
import sys
import warnings

import torch
from torch.utils import _pytree as pytree

from .repeated_layers import _tensor_key, _value_key, assign, ensure_module, layer_state

ENTRIES = 8  # distinct models kept; each entry is a graph (meta values included), no weights
_CACHE: collections.OrderedDict = collections.OrderedDict()
stats: collections.Counter = collections.Counter()  # "hits", "misses": tests and benchmarks read them


def graph_key(model: torch.nn.Module, example_args, example_kwargs, dynamic_shapes):
    """What the exported graph of `model` for these example inputs depends on."""
    code = tuple(
        (name, tuple((k, id(v)) for k, v in vars(sys.modules[name]).items() if callable(v)))
        for name in sorted({type(m).__module__ for m in model.modules()})
        if name in sys.modules
    )
    inputs = tuple(
        ("tensor", _tensor_key(x)) if isinstance(x, torch.Tensor) else _value_key(x)
        for x in pytree.tree_leaves((example_args, example_kwargs))
    )
    context = (torch.is_grad_enabled(), torch.get_default_dtype(), torch.is_autocast_enabled("cpu"),
               torch.is_autocast_enabled("cuda"), torch.are_deterministic_algorithms_enabled())
    state = layer_state(model, skip={"_parameters", "_buffers", "_modules"})
    return (type(model), state, code, inputs, repr(dynamic_shapes), tuple(example_kwargs or ()), context)


def _model_tensors(model):
    return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))


def store(key, gm: torch.fx.GraphModule, model: torch.nn.Module, stamped: int) -> None:
    """Keep a copy of captured `gm`'s graph (the passes rewrite the original in place) and the
    attributes it reads that are not `model`'s tensors (export's constants, its guard module)."""
    tensors = _model_tensors(model)
    own = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in tensors:
            value = _fetch(gm, node.target)
            own[node.target] = value.clone() if isinstance(value, torch.Tensor) else value
    _CACHE[key] = (_copy(gm.graph), own, stamped)
    _CACHE.move_to_end(key)
    while len(_CACHE) > ENTRIES:
        _CACHE.popitem(last=False)


def lookup(key, model: torch.nn.Module) -> tuple[torch.fx.GraphModule | None, int]:
    """The cached graph for `key` over `model`'s own tensors (None if there is none), and the
    number of layers its capture stamped."""
    entry = _CACHE.get(key)
    stats["hits" if entry is not None else "misses"] += 1
    if entry is None:
        return None, 0
    _CACHE.move_to_end(key)
    cached, own, stamped = entry
    tensors = _model_tensors(model)
    graph = _copy(cached)
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        owner, _, leaf = node.target.rpartition(".")
        holder = ensure_module(root, owner)
        if hasattr(holder, leaf):
            continue
        if node.target in tensors:
            value = tensors[node.target]
        else:
            value = own[node.target]
            value = value.clone() if isinstance(value, torch.Tensor) else value
        assign(holder, leaf, value)
    return torch.fx.GraphModule(root, graph), stamped


def _copy(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of `graph`: new nodes (meta dicts copied, their values shared: fake tensors)."""
    with warnings.catch_warnings():  # fx's Graph.__deepcopy__ copies pytree LeafSpecs the deprecated way
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        return copy.deepcopy(graph)


def _fetch(root, target):
    owner, _, leaf = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, leaf)


def clear() -> None:
    _CACHE.clear()
