"""Views: the model captured once more, over the training graph's own tensors.

A LoraModel's graph_module is its parameter store. A view is another graph of the same model
(other inputs, e.g. position_ids, or a KV cache for decoding): captured from a skeleton of the
original class (lorafx/core/capture.py), run through the same pass pipeline, then every
parameter and buffer it ends up with is replaced by the store's tensor of the same name. No
weight exists twice; load_adapter / set_adapter / an optimizer step are seen by every view.
LoraModel.entry_point keeps them (built on first use, dropped when the store changes shape).
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import torch

from lorafx.passes import TRANSFORM_PASSES, dropout_follows_mode, match_linears, quantize_nf4, run_passes
from lorafx.passes.adapter_bank import IDS, LoraBank, add_banks, banks, strip_lora
from lorafx.passes.quantize_nf4 import STORAGE, NF4Storage
from lorafx.variants import variant_of

from .capture import CaptureError, capture, hf_dynamic_shapes, skeleton
from .spec import LoraSpec


def recapture(lm, model, example_kwargs, dynamic_shapes, disabled=False, checkpoint=True) -> torch.fx.GraphModule:
    """`model` (a skeleton over lm's store) captured with these inputs and given lm's
    adapters: the store's tensors, banks and NF4 storage; no LoRA if `disabled`."""
    store = lm.graph_module
    spec, passes = _pipeline(lm, store, checkpoint)
    with torch.random.fork_rng(devices=[]):  # the passes draw LoRA inits, replaced below: keep the user's RNG
        gm = capture(model, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes).graph_module
        for name, module in _nf4_modules(store):  # quantize_nf4 then uses them as loaded, quantizing nothing
            gm.get_submodule(name.rpartition(".")[0]).add_module(STORAGE, module)
        run_passes(gm, spec, passes)
        for name, _ in _nf4_modules(store):  # the placeholder weights the graph no longer reads
            gm.get_submodule(name.rpartition(".")[0])._parameters.pop("weight", None)
    variant = variant_of(spec)
    if lm._adapters is not None:  # a bank graph: the same banks as the store's, shared
        strip_lora(gm)
        add_banks(gm, {path for path, _ in banks(store)})
    if disabled and not lm._merged:
        (variant.strip if variant else strip_lora)(gm)
    _adopt(gm, store)
    if disabled:
        use_original_weights(lm, gm)
    return gm


def use_original_weights(lm, gm) -> None:
    """A base-model graph reads the original weights of modules_to_save, not the trained ones."""
    for key, original in lm.original_weights.named_buffers():
        owner, _, leaf = key.replace(":", ".").rpartition(".")
        module = gm.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(original, requires_grad=False)


def with_inputs(lm, names: tuple[str, ...], disabled: bool) -> torch.fx.GraphModule:
    """lm's model captured with the keyword inputs `names` (e.g. input_ids, position_ids)."""
    example = _example(lm, names)
    model = skeleton(lm._blueprint, lm.graph_module)
    return recapture(lm, model, example, hf_dynamic_shapes(lm.config, example), disabled)


def _example(lm, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A (2, 8) example of the keyword inputs `names`: sizes above 1 keep batch and seq symbolic."""
    device = device_of(lm.graph_module)
    ids = torch.randint(0, lm.config.get_text_config().vocab_size or 2, (2, 8), device=device)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(8, device=device).expand(2, 8)}
    example["token_type_ids"] = torch.zeros_like(ids)  # type 0 exists in every BERT-family model
    return {name: example[name] for name in names}


class _Backbone(torch.nn.Module):
    """The original model's backbone under its own attribute name, so that every parameter path
    ("model.layers.0.self_attn.q_proj.weight") is the full model's: the same pass pipeline
    selects the same layers, and the store's tensors are adopted by name."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.prefix = model.base_model_prefix
        self.add_module(self.prefix, getattr(model, self.prefix))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        backbone = getattr(self, self.prefix)
        return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def backbone(lm, names: tuple[str, ...], disabled: bool) -> torch.fx.GraphModule:
    """lm's backbone (PreTrainedModel.base_model) captured with the keyword inputs `names`; it
    returns the backbone's output (last_hidden_state), LoRA included."""
    example = _example(lm, names)
    model = _Backbone(skeleton(lm._blueprint, lm.graph_module))
    return recapture(lm, model, example, hf_dynamic_shapes(lm.config, example), disabled)


def _pipeline(lm, store, checkpoint):
    """The training pipeline, made safe to run over the store's own tensors: nothing rewrites a
    weight (no PiSSA/LoftQ init, NF4 only where the store already holds it); a merged model gets
    no adapter."""
    spec = lm.spec
    if isinstance(spec, LoraSpec):
        stored = [name.rpartition(".")[0] for name, _ in _nf4_modules(store)]
        keep = "|".join(map(re.escape, stored))
        spec = dataclasses.replace(
            spec,
            init="kaiming",
            checkpoint=spec.checkpoint if checkpoint else None,
            quantize="nf4" if stored else None,
            quantize_skip=f"(?!(?:{keep})$).*" if stored else None,
        )
    if lm._merged:
        return spec, [dropout_follows_mode, match_linears, quantize_nf4]
    variant = variant_of(spec)
    return spec, variant.passes if variant else TRANSFORM_PASSES


def _nf4_modules(store):
    return [(name, m) for name, m in store.named_modules() if isinstance(m, NF4Storage)]


def device_of(store) -> torch.device:
    for t in itertools.chain(store.parameters(), store.buffers()):
        return t.device
    return torch.device("cpu")


def _adopt(gm, store) -> None:
    """Every parameter and buffer of `gm` becomes the store's tensor of the same name (buffers
    the store lacks — a KV cache, constants the capture lifted — stay the view's own, as does
    the per-row adapter ids buffer); the modules whose tensors change object as adapters come
    and go (banks, NF4) are shared whole."""
    for name, module in store.named_modules():
        if isinstance(module, (LoraBank, NF4Storage)):
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
    tensors = dict(store.named_parameters(remove_duplicate=False)) | dict(store.named_buffers(remove_duplicate=False))
    for kind in ("_parameters", "_buffers"):
        for path, module in gm.named_modules():
            for leaf, tensor in list(getattr(module, kind).items()):
                name = f"{path}.{leaf}" if path else leaf
                if tensor is None or name == IDS:
                    continue
                if name not in tensors:
                    if kind == "_buffers":
                        continue
                    raise CaptureError(f"the second capture has parameter {name}, which the training graph lacks")
                getattr(module, kind)[leaf] = tensors[name]
