"""The decode entry point: the model captured a second time, with a static KV cache.

One graph serves the prefill (any prompt length) and the one-token steps:

    logits = decoder(input_ids=(B, S), attention_mask=(B, L), position_ids=(B, S), cache_position=(S,))

`attention_mask` covers the whole cache (1 where a token was written, 0 for padding and for
positions not reached yet); `cache_position` says where in the cache the S new tokens go. The
cache tensors are buffers of the graph, updated in place (transformers' StaticCache, made
exportable as its executorch integration does).

It is a view (lorafx/core/views.py): captured from a skeleton of the original class, run
through the training graph's pass pipeline, holding the training graph's own tensors.
"""

from __future__ import annotations

import torch
import transformers
from transformers.integrations.executorch import get_head_shapes

from lorafx.core.capture import CaptureError, skeleton
from lorafx.core.views import device_of, recapture

CACHE = "lorafx_kv_cache"  # graph buffers lorafx_kv_cache_<keys|values|length>_<layer>
INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")


class GenerationError(ValueError):
    """An input generate() or the decode graph cannot take: the message names it."""


def capture_decoder(
    lm, batch: int, cache_len: int, disabled: bool = False, last_only: bool = False
) -> torch.fx.GraphModule:
    """The decode graph of `lm` for `batch` rows and a cache of `cache_len` positions.

    `last_only` returns the logits of the last position only, (B, 1, V), as transformers'
    generate does with logits_to_keep=1: a prefill then skips the output head on every other
    prompt position. The exported decoder keeps every position."""
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
    keep = {"logits_to_keep": 1} if last_only else {}

    def decode(input_ids, attention_mask, position_ids, cache_position):
        for layer in cache.layers:  # where this call writes: the graph carries no Python state between calls
            layer.cumulative_length.copy_(cache_position[0])
        return forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **keep,
        ).logits

    model.forward = decode
    device = device_of(store)
    example = min(8, cache_len)
    kwargs = {
        "input_ids": torch.zeros(batch, example, dtype=torch.long, device=device),
        "attention_mask": torch.ones(batch, cache_len, dtype=torch.long, device=device),
        "position_ids": torch.arange(example, device=device).expand(batch, example),
        "cache_position": torch.arange(example, device=device),
    }
    seq = torch.export.Dim("seq", min=1, max=cache_len)
    shapes = {"input_ids": {1: seq}, "attention_mask": None, "position_ids": {1: seq}, "cache_position": {0: seq}}
    try:
        gm = recapture(lm, model, kwargs, shapes, disabled, checkpoint=False)
    except CaptureError as e:
        raise CaptureError(f"the decode graph (static KV cache) could not be captured: {e}") from e
    _one_name_per_cache_tensor(gm)
    return gm


def _one_name_per_cache_tensor(gm) -> None:
    """The capture reads the cache through the StaticCache object, so it also lifts each cache
    tensor as a constant (lifted_tensor_N) beside its buffer: point the graph at the buffer
    and drop the alias (AOTInductor refuses a mutated tensor under two names)."""
    names = {id(t): name for name, t in gm.named_buffers() if name.startswith(CACHE)}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target.startswith(CACHE):
            continue
        owner_path, _, leaf = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        tensor = getattr(owner, leaf)
        if id(tensor) in names:
            node.target = names[id(tensor)]
            owner._buffers.pop(leaf, None)
            if hasattr(owner, leaf):
                delattr(owner, leaf)
    gm.recompile()


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
