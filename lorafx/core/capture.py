"""Capture an nn.Module as a torch.fx GraphModule with torch.export (non-strict).

Weights stay `get_attr` nodes named by their module path and every node carries
`meta["nn_module_stack"]`, which is what the passes match on. The module is captured in
training mode so dropout probabilities are in the graph; the `dropout_follows_mode` pass
then makes them follow `.train()` / `.eval()` again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings

import torch
from torch.export import Dim

from lorafx.passes.quantize_nf4 import STORAGE

from . import graph_cache
from .repeated_layers import StampRefused, expand, repeated_layers, stamping

# Inputs the captured graph of a Hugging Face model takes; everything else is refused at
# call time with a clear error rather than silently ignored.
HF_INPUTS = ("input_ids", "attention_mask")


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


@dataclasses.dataclass
class Captured:
    graph_module: torch.fx.GraphModule
    input_names: tuple[str, ...] | None  # keyword inputs of an HF model; None for plain modules
    output_head: str | None  # module path of the output embeddings (excluded by all-linear)
    hf_model: bool
    blueprint: torch.nn.Module  # the model with meta parameters: what skeleton() rebuilds from
    stamped_layers: int = 0  # repeated layers copied from their representative's trace, not traced
    cached: bool = False  # the graph is a copy of an earlier capture's (graph_cache)


def is_hf_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_output_embeddings")


def capture(model: torch.nn.Module, example_args=(), example_kwargs=None, dynamic_shapes=None) -> Captured:
    """Export `model` and return its graph with dynamic batch/sequence for HF models.

    Plain modules need `example_args`/`example_kwargs`; every tensor dim is then left to
    torch.export to keep dynamic where the code allows (`Dim.AUTO`) unless `dynamic_shapes`
    is given.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lorafx captures torch.nn.Module objects, got {type(model).__name__}")
    hf = is_hf_model(model)
    if hf and not example_args and example_kwargs is None:
        example_kwargs, dynamic_shapes = _hf_example(model)
    elif not example_args and not example_kwargs:
        raise CaptureError(
            f"{type(model).__name__} is not a Hugging Face model: pass example inputs, "
            "e.g. lorafx.transform(model, spec, example_args=(x,))"
        )
    example_kwargs = example_kwargs or {}
    if dynamic_shapes is None:
        dynamic_shapes = auto_dynamic_shapes((*example_args, *example_kwargs.values()))
    key = graph_cache.graph_key(model, example_args, example_kwargs, dynamic_shapes)
    plan = blueprint(model)  # before any pass empties a weight it quantizes
    gm, stamped = graph_cache.lookup(key, model)
    cached = gm is not None
    if not cached:
        gm, stamped = _export_stamped(model, example_args, example_kwargs, dynamic_shapes)
        graph_cache.store(key, gm, model, stamped)
    head = _output_head_path(model) if hf else None
    names = tuple(example_kwargs) if hf else None
    return Captured(graph_module=gm, input_names=names, output_head=head, hf_model=hf, blueprint=plan,
                    stamped_layers=stamped, cached=cached)


def _export_stamped(model, example_args, example_kwargs, dynamic_shapes) -> tuple[torch.fx.GraphModule, int]:
    """The exported graph, each repeated decoder layer traced once (lorafx/core/repeated_layers.py),
    and the number of layers stamped."""
    exported, stamped = None, 0
    repeats = repeated_layers(model)
    if repeats:
        try:
            with stamping(model, repeats) as stamps:
                exported = _export(model, example_args, example_kwargs, dynamic_shapes)
            stamped = expand(exported, stamps, model)
        except (StampRefused, CaptureError) as e:
            if not _refused(e):
                raise
            exported = None  # a representative's trace was not one its repeats share: trace every layer
    if exported is None:
        exported = _export(model, example_args, example_kwargs, dynamic_shapes)
    # ep.module() refuses .train()/.eval(); a plain GraphModule over the same graph does not.
    # Built after the stamps are expanded, so its code is generated once (0.5 s at 32 layers, loaded).
    return torch.fx.GraphModule(exported, exported.graph), stamped


def _export(model, example_args, example_kwargs, dynamic_shapes) -> torch.fx.GraphModule:
    """ep.module(): the exported program as a module over the model's own tensors."""
    was_training = model.training
    try:
        with _no_kv_cache(model):
            model.train()
            ep = torch.export.export(
                model, tuple(example_args), example_kwargs, dynamic_shapes=dynamic_shapes, strict=False
            )
    except Exception as e:  # torch.export raises many types; re-raise one that names the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {first}") from e
    finally:
        model.train(was_training)
    return ep.module()


def _refused(error: BaseException | None) -> bool:
    """Whether `error` is, or was raised from, a StampRefused (export wraps what the model raises)."""
    while error is not None:
        if isinstance(error, StampRefused):
            return True
        error = error.__cause__ or error.__context__
    return False


def auto_dynamic_shapes(inputs) -> list:
    """torch.export dynamic_shapes leaving every tensor dim of `inputs` to Dim.AUTO: symbolic
    where the model's code allows, specialized where it does not."""
    return [
        torch.utils._pytree.tree_map(
            lambda x: {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None, value
        )
        for value in inputs
    ]


def _hf_example(model):
    """A (2, 8) batch of token ids: sizes above 1 so export keeps batch and seq symbolic."""
    vocab = getattr(model.config, "vocab_size", None) or 2
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (2, 8), device=device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return kwargs, hf_dynamic_shapes(model.config, kwargs)


def hf_dynamic_shapes(config, names) -> dict:
    """Dynamic batch and sequence dims for an HF model's (batch, seq) inputs. Models with
    absolute position embeddings (BERT, GPT-2) index a table of max_position_embeddings
    rows, and export needs that bound to prove the lookup in range."""
    batch, seq = Dim("batch"), Dim("seq", max=getattr(config, "max_position_embeddings", None) or None)
    return {name: {0: batch, 1: seq} for name in names}


@contextlib.contextmanager
def _no_kv_cache(model):
    """HF decoders return a DynamicCache by default, which torch.export cannot output."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    old = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = old


def _output_head_path(model) -> str | None:
    head = model.get_output_embeddings()
    if head is None:
        return None
    return next(name for name, module in model.named_modules() if module is head)


@contextlib.contextmanager
def parameters_on_meta():
    """Build a model whose parameters are on the meta device (buffers stay real, as
    accelerate's init_empty_weights(include_buffers=False) does)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:  # a meta param is being tied: keep its identity
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def blueprint(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are on the meta device (buffers, config and
    generation_config are copied): the structure, at no memory cost."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    with warnings.catch_warnings():  # fx's Graph.__deepcopy__ (a submodule may be a GraphModule)
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        return copy.deepcopy(model, memo)


def skeleton(plan: torch.nn.Module, store: torch.nn.Module) -> torch.nn.Module:
    """A copy of the blueprint `plan` holding `store`'s tensors: every parameter and buffer the
    store has under the same name is that very tensor (no copy); a weight the store keeps as
    NF4 instead becomes a placeholder that owns no memory (a stride-0 view of one element).
    Used to capture a model a second time, e.g. with a KV cache, over the same weights."""
    tensors = dict(store.named_parameters(remove_duplicate=False)) | dict(store.named_buffers(remove_duplicate=False))
    first = next(iter(tensors.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    modules = dict(store.named_modules())
    model = copy.deepcopy(plan)
    for path, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for leaf, tensor in list(table.items()):
                if tensor is None:
                    continue
                name = f"{path}.{leaf}" if path else leaf
                if name in tensors:
                    table[leaf] = tensors[name]
                elif kind == "_buffers":
                    table[leaf] = tensor.to(device)
                else:
                    nf4 = modules.get(f"{path}.{STORAGE}")  # its dequantized weight's dtype
                    dtype = nf4.dtype if nf4 is not None else tensor.dtype
                    placeholder = torch.zeros((), dtype=dtype, device=device).expand(tensor.shape)
                    table[leaf] = torch.nn.Parameter(placeholder, requires_grad=False)
    return model.train(store.training)
