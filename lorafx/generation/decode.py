"""The decode entry point: the model captured a second time, with a static KV cache.

One graph serves the prefill (any prompt length) and the one-token steps:

    logits = decoder(input_ids=(B, S), attention_mask=(B, L), position_ids=(B, S), cache_position=(S,))

`attention_mask` covers the whole cache (1 where a token was written, 0 for padding and for
positions not reached yet); `cache_position` says where in the cache the S new tokens go. The
cache tensors are buffers of the graph, updated in place (transformers' StaticCache, made
exportable as its executorch integration does).

The graph is captured from a skeleton of the original class (parameters: the store's own
tensors, or one-element placeholders where the store holds NF4 instead), then the same pass
pipeline as the training graph runs on it, and every parameter and buffer it ends up with is
replaced by the training graph's tensor of the same name: no weight exists twice, and a
load_adapter / set_adapter is seen by both graphs.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import torch
import transformers
from transformers.integrations.executorch import get_head_shapes

from lorafx.core.capture import CaptureError, capture, skeleton
from lorafx.core.spec import LoraSpec
from lorafx.passes import TRANSFORM_PASSES, dropout_follows_mode, match_linears, quantize_nf4, run_passes
from lorafx.passes.adapter_bank import IDS, LoraBank, add_banks, banks, strip_lora
from lorafx.passes.quantize_nf4 import STORAGE, NF4Storage
from lorafx.variants import variant_of

CACHE = "lorafx_kv_cache"  # graph buffers lorafx_kv_cache_<keys|values|length>_<layer>
INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")


class GenerationError(ValueError):
    """An input generate() or the decode graph cannot take: the message names it."""


def capture_decoder(lm, batch: int, cache_len: int, disabled: bool = False) -> torch.fx.GraphModule:
    """The decode graph of `lm` for `batch` rows and a cache of `cache_len` positions."""
    plan = lm._blueprint
    if lm.config is None or not hasattr(plan, "generation_config"):
        raise GenerationError(f"generate needs a Hugging Face language model; {lm.model_class} has no decode path")
    if not getattr(plan, "_supports_static_cache", True) or not getattr(plan, "_can_compile_fullgraph", True):
        raise GenerationError(f"{lm.model_class} has no static KV cache path in transformers; generate cannot decode it")
    store = lm.graph_module
    model = skeleton(plan, store)
    cache = _static_cache(model, batch, cache_len, _dtype(store))
    for i, layer in enumerate(cache.layers):
        for kind, tensor in (("keys", layer.keys), ("values", layer.values), ("length", layer.cumulative_length)):
            model.register_buffer(f"{CACHE}_{kind}_{i}", tensor, persistent=False)
    forward = model.forward

    def decode(input_ids, attention_mask, position_ids, cache_position):
        for layer in cache.layers:  # where this call writes: the graph carries no Python state between calls
            layer.cumulative_length.copy_(cache_position[0])
        return forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        ).logits

    model.forward = decode
    device = _device(store)
    example = min(8, cache_len)
    kwargs = {
        "input_ids": torch.zeros(batch, example, dtype=torch.long, device=device),
        "attention_mask": torch.ones(batch, cache_len, dtype=torch.long, device=device),
        "position_ids": torch.arange(example, device=device).expand(batch, example),
        "cache_position": torch.arange(example, device=device),
    }
    seq = torch.export.Dim("seq", min=1, max=cache_len)
    shapes = {"input_ids": {1: seq}, "attention_mask": None, "position_ids": {1: seq}, "cache_position": {0: seq}}
    spec, passes = _decode_passes(lm, store)
    with torch.random.fork_rng(devices=[]):  # the passes draw LoRA inits, replaced below: keep the user's RNG
        try:
            gm = capture(model, example_kwargs=kwargs, dynamic_shapes=shapes).graph_module
        except CaptureError as e:
            raise CaptureError(f"the decode graph (static KV cache) could not be captured: {e}") from e
        _share_nf4(gm, store)
        run_passes(gm, spec, passes)
        _drop_placeholders(gm, store)
    variant = variant_of(spec)
    if lm._adapters is not None:  # a bank graph: the same banks as the store's, shared
        strip_lora(gm)
        add_banks(gm, {path for path, _ in banks(store)})
    if disabled and not lm._merged:
        (variant.strip if variant else strip_lora)(gm)
    _adopt(gm, store)
    return gm


def _decode_passes(lm, store):
    """The training pipeline, made safe to run over the store's own tensors: nothing rewrites a
    weight (no PiSSA/LoftQ init, NF4 only where the store already holds it) and no
    checkpointing; a merged model gets no adapter."""
    spec = lm.spec
    if isinstance(spec, LoraSpec):
        stored = [name.rpartition(".")[0] for name, m in store.named_modules() if isinstance(m, NF4Storage)]
        keep = "|".join(map(re.escape, stored))
        spec = dataclasses.replace(
            spec,
            init="kaiming",
            checkpoint=None,
            quantize="nf4" if stored else None,
            quantize_skip=f"(?!(?:{keep})$).*" if stored else None,
        )
    if lm._merged:
        return spec, [dropout_follows_mode, match_linears, quantize_nf4]
    variant = variant_of(spec)
    return spec, variant.passes if variant else TRANSFORM_PASSES


def _device(store) -> torch.device:
    for t in itertools.chain(store.parameters(), store.buffers()):
        return t.device
    return torch.device("cpu")


def _dtype(store) -> torch.dtype:
    for p in store.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _static_cache(model, batch, cache_len, dtype):
    config = model.config.get_text_config()
    cache = transformers.StaticCache(config=config, max_cache_len=cache_len)
    window = getattr(config, "sliding_window", None)
    for i, layer in enumerate(cache.layers):
        if type(layer).__name__ != "StaticLayer":  # sliding-window layers branch on the position
            if window is not None and cache_len > window:
                raise GenerationError(
                    f"{type(model).__name__} uses sliding-window attention (window {window}); the decode graph "
                    f"supports prompt + max_new_tokens <= {window}, got a cache of {cache_len}"
                )
            cache.layers[i] = transformers.cache_utils.StaticLayer(cache_len)
    heads, head_dim = get_head_shapes(config)
    device = next(model.parameters()).device
    cache.early_initialization(batch, heads, head_dim, dtype, device)
    return cache


def _share_nf4(gm, store) -> None:
    """The store's NF4 storage modules, installed in the decode graph before quantize_nf4 runs
    (which then uses them as loaded, quantizing nothing)."""
    for name, module in store.named_modules():
        if isinstance(module, NF4Storage):
            gm.get_submodule(name.rpartition(".")[0]).add_module(STORAGE, module)


def _drop_placeholders(gm, store) -> None:
    """The placeholder weights of NF4 layers, which the graph no longer reads after quantize_nf4."""
    for name, module in store.named_modules():
        if isinstance(module, NF4Storage):
            gm.get_submodule(name.rpartition(".")[0])._parameters.pop("weight", None)


def _adopt(gm, store) -> None:
    """Every parameter and buffer of `gm` becomes the store's tensor of the same name (buffers
    the store lacks — the cache, constants the capture lifted — stay the graph's own); the
    modules whose tensors change object as adapters come and go (banks, NF4) are shared whole."""
    for name, module in store.named_modules():
        if isinstance(module, (LoraBank, NF4Storage)):
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
    tensors = dict(store.named_parameters(remove_duplicate=False)) | dict(store.named_buffers(remove_duplicate=False))
    for kind in ("_parameters", "_buffers"):
        for path, module in gm.named_modules():
            for leaf, tensor in list(getattr(module, kind).items()):
                name = f"{path}.{leaf}" if path else leaf
                if tensor is None or name.startswith(CACHE) or name == IDS:
                    continue
                if name not in tensors:
                    if kind == "_buffers":  # a constant the capture lifted (lifted_tensor_0): the graph's own
                        continue
                    raise CaptureError(f"the decode graph has parameter {name}, which the training graph lacks")
                getattr(module, kind)[leaf] = tensors[name]
