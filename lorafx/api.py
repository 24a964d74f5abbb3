"""transform() and LoraModel: the user-facing wrapper around the rewritten GraphModule."""

from __future__ import annotations

import copy
import os
from typing import Iterator

import torch

from lorafx.passes import (
    TRANSFORM_PASSES,
    PassResult,
    graph_nodes,
    inline_checkpointed_layers,
    merge_lora,
    run_passes,
    unfuse_nf4_lora,
)
from lorafx.passes.common import LINEAR, LORA, LinearSite

from . import adapters
from .capture import Captured, capture
from .spec import LoraSpec

GRAPH_PREFIX = "graph_module."


def transform(
    model: torch.nn.Module,
    spec: LoraSpec,
    example_args=(),
    example_kwargs=None,
    dynamic_shapes=None,
) -> "LoraModel":
    """Capture `model`, run the pass pipeline and return a trainable LoraModel.

    Hugging Face models need no example inputs (one is made from the config, with dynamic
    batch and sequence length). Base parameters are frozen in place, as PEFT does.
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec must be a lorafx.LoraSpec, got {type(spec).__name__}")
    if isinstance(model, LoraModel):
        raise TypeError("model is already a LoraModel; transform the original model instead")
    captured = capture(model, example_args, example_kwargs, dynamic_shapes)
    spec = spec.resolved(captured.output_head)
    results = run_passes(captured.graph_module, spec, TRANSFORM_PASSES)
    lm = LoraModel(captured, spec, model)
    lm.pass_results = results
    lm.train(model.training)
    return lm


class LoraModel(torch.nn.Module):
    """The captured model with LoRA branches: same call and output type as the original.

    For Hugging Face models `forward(input_ids, attention_mask=None, labels=None)` returns
    the model's own output class; with labels, `.loss` is the model's own loss function.
    """

    def __init__(self, captured: Captured, spec: LoraSpec, model: torch.nn.Module):
        super().__init__()
        self.graph_module = captured.graph_module
        self.spec = spec
        self.input_names = captured.input_names
        self.pass_results: list[PassResult] = []
        config = getattr(model, "config", None)
        self.config = config
        self._loss_function = getattr(model, "loss_function", None) if captured.hf_model else None
        self._base_name = getattr(config, "_name_or_path", None) or None
        self.model_class = type(model).__name__

    # -- calling ---------------------------------------------------------------------------
    def forward(self, *args, labels=None, **kwargs):
        if self.input_names is None:
            if labels is not None:
                raise TypeError("labels= is only supported for Hugging Face models")
            return self.graph_module(*args, **kwargs)
        inputs = self._hf_inputs(args, kwargs)
        out = self.graph_module(**inputs)
        if labels is not None:
            if self._loss_function is None:
                raise TypeError(f"{type(self.config).__name__} model has no loss function for labels=")
            if not isinstance(labels, torch.Tensor) or labels.shape != inputs["input_ids"].shape:
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"labels has shape {got}; it must match input_ids {tuple(inputs['input_ids'].shape)}")
            loss = self._loss_function(logits=out["logits"], labels=labels, vocab_size=self.config.vocab_size)
            out = type(out)(loss=loss, **out)  # loss first, as the model itself returns it
        return out

    def _hf_inputs(self, args, kwargs):
        if args:
            if len(args) > 1:
                raise TypeError("pass inputs other than input_ids by keyword")
            kwargs = {"input_ids": args[0], **kwargs}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.pop("return_dict", None)  # the graph always returns the model's output class
        if kwargs.pop("use_cache", False):
            raise TypeError("use_cache=True is not supported: the graph was captured without a KV cache")
        unknown = sorted(set(kwargs) - set(self.input_names))
        if unknown:
            raise TypeError(
                f"LoraModel got unsupported inputs {unknown}; the captured graph takes "
                f"{list(self.input_names)} (and labels=)"
            )
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor (batch, sequence)")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {ids.dtype}")
        if 0 in ids.shape:
            raise ValueError(f"input_ids has shape {tuple(ids.shape)}: batch and sequence length must be >= 1")
        if "attention_mask" in self.input_names and "attention_mask" not in kwargs:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if kwargs["attention_mask"].shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(kwargs['attention_mask'].shape)} != input_ids shape {tuple(ids.shape)}"
            )
        return kwargs

    # -- parameters ------------------------------------------------------------------------
    def named_lora_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """LoRA parameters with PEFT-style names: `model.layers.0.self_attn.q_proj.lora_A.weight`."""
        for name, p in self.graph_module.named_parameters():
            if ".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector"):
                yield name, p

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def linear_sites(self) -> dict[str, LinearSite]:
        """Every linear layer match_linears found, by module path."""
        return {
            n.meta[LINEAR].path: n.meta[LINEAR] for n in graph_nodes(self.graph_module) if LINEAR in n.meta
        }

    def lora_paths(self) -> list[str]:
        """Module paths that carry a LoRA branch, in graph order."""
        seen = {}
        for node in graph_nodes(self.graph_module):
            if LORA in node.meta:
                seen.setdefault(node.meta[LORA][0], None)
        return list(seen)

    # -- adapters and deployment ----------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike) -> None:
        """Write adapter_model.safetensors + adapter_config.json exactly as PEFT does."""
        adapters.save_adapter(self, directory)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load an adapter saved by lorafx or PEFT; checks config, keys and shapes first."""
        adapters.load_adapter(self, directory)

    def save_quantized(self, directory: str | os.PathLike) -> None:
        """The base model as a transformers bitsandbytes 4-bit checkpoint folder (LoRA not included)."""
        from .loading import save_quantized  # loading imports this module

        save_quantized(self, directory)

    def merge(self) -> "LoraModel":
        """A copy with scale·B·A folded into the base weights and no LoRA nodes or parameters.

        `self` is left as it was, so there is no unmerge: keep training or saving the
        unmerged model and call merge() again when you need a deployable copy.
        """
        merged = copy.deepcopy(self)
        # merge_lora reads insert_lora's flat subgraph: undo checkpointing and fusion first.
        merged.pass_results = [
            inline_checkpointed_layers(merged.graph_module, self.spec),
            unfuse_nf4_lora(merged.graph_module, self.spec),
            merge_lora(merged.graph_module, self.spec),
        ]
        return merged


def print_trainable_parameters(model: torch.nn.Module) -> None:
    """Print the counts in PEFT's `print_trainable_parameters` format."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # deduplicated, so tied embeddings count once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
