"""What transformers' Trainer, TRL and accelerate read from a PEFT model, on LoraModel.

Trainer and TRL's trainers were written against `PeftModel` and `PreTrainedModel`: they read
attributes (`dtype`, `device`, `generation_config`, `loss_type`, ...), call a few methods
(`gradient_checkpointing_enable`, `enable_input_require_grads`, `add_model_tags`,
`save_pretrained`) and, for TRL's fused LM head, run the backbone on its own (`base_model`)
and project through `get_output_embeddings()`. `PeftSurface` gives LoraModel that surface,
each member doing what it does in PEFT or transformers, over the captured graphs:

- modules a caller holds (`get_input_embeddings`, `get_output_embeddings`) are real torch
  modules of a skeleton of the original model over the store's very tensors (no copy);
  calling them works, hooks on them never reach the captured graph;
- `base_model` is the backbone captured once more over the same tensors (a view, with LoRA),
  which is what `PreTrainedModel.base_model` is to TRL; `get_base_model()` is the adapted
  model itself, as PEFT's is the transformers model with LoRA layers inside;
- `gradient_checkpointing_enable/disable` run the checkpoint_layers pass (or its inverse) on
  the training graph in place: no re-capture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os

import torch

from lorafx.passes import checkpoint_layers, inline_checkpointed_layers
from lorafx.variants import files_for

from . import named_adapters, views
from .capture import skeleton
from .spec import LoraSpec


class PeftSurface:
    """The PeftModel / PreTrainedModel members Trainer, TRL and PEFT users reach for (mixed
    into LoraModel; see the module docstring)."""

    supports_gradient_checkpointing = True

    # -- what the model is ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the parameters (PreTrainedModel.device)."""
        return views.device_of(self.graph_module)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the base model's floating-point weights (PreTrainedModel.dtype); LoRA
        weights may be float32 on a 16-bit base, as PEFT keeps them."""
        lora = {id(p) for _, p in self.named_lora_parameters()}
        floats = [p.dtype for p in self.graph_module.parameters() if p.is_floating_point()]
        base = [p.dtype for p in self.graph_module.parameters() if p.is_floating_point() and id(p) not in lora]
        return (base or floats or [torch.get_default_dtype()])[0]

    @property
    def loss_type(self) -> str | None:
        """The original model's loss_type: Trainer counts `num_items_in_batch` over the shifted
        labels only when it is "ForCausalLM", as for the model itself."""
        return getattr(self._blueprint, "loss_type", None)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """True where the original model takes loss kwargs (its forward has **kwargs): Trainer then
        passes `num_items_in_batch`, which forward hands to the model's loss function."""
        if self._loss_function is None:
            return False
        explicit = getattr(self._blueprint, "accepts_loss_kwargs", None)
        if explicit is not None:
            return explicit
        params = inspect.signature(type(self._blueprint).forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    @property
    def peft_config(self) -> dict:
        """{adapter name: peft config object}, as PeftModel.peft_config (needs peft installed)."""
        import peft  # an optional dependency: only this member needs it

        if self._adapters is None:
            return {"default": peft.get_peft_config(files_for(self.spec).peft_config(self))}
        return {name: peft.get_peft_config(dict(adapter.config)) for name, adapter in self._adapters.items()}

    @property
    def model_tags(self) -> list[str]:
        return self.__dict__.setdefault("_model_tags", [])

    def add_model_tags(self, tags: str | list[str]) -> None:
        """Tags for a model card (PreTrainedModel.add_model_tags; TRL adds its trainer's name)."""
        for tag in [tags] if isinstance(tags, str) else tags:
            if tag not in self.model_tags:
                self.model_tags.append(tag)

    # -- parameters ------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, tied weights once (PeftModel's)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print the counts as PeftModel.print_trainable_parameters does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """PreTrainedModel.num_parameters: all (or trainable) parameters, optionally without the
        embedding matrices."""
        params = list(self.parameters())
        if exclude_embeddings:
            embeddings = {id(m.weight) for m in self._skeleton().modules() if isinstance(m, torch.nn.Embedding)}
            params = [p for p in params if id(p) not in embeddings]
        return sum(p.numel() for p in params if p.requires_grad or not only_trainable)

    # -- modules callers hold --------------------------------------------------------------
    def _skeleton(self) -> torch.nn.Module:
        """The original model's modules over the store's tensors (built once per store layout)."""
        self._require_hf("the original model's modules")
        return self.entry_point("skeleton", lambda: skeleton(self._blueprint, self.graph_module))

    def get_input_embeddings(self) -> torch.nn.Module:
        """The token embedding module, holding the model's own embedding weight."""
        return self._skeleton().get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module | None:
        """The output head module (lm_head), holding the model's own weight. Refused where the head
        carries LoRA or is NF4: its weight alone is not what the graph computes."""
        head = self._skeleton().get_output_embeddings()
        if head is not None:
            path = next(name for name, module in self._skeleton().named_modules() if module is head)
            placeholder = 0 in head.weight.stride() and head.weight.numel() > 1  # NF4: the store holds no float weight
            if path in self.lora_paths() or placeholder:
                raise NotImplementedError(
                    f"get_output_embeddings: the output head {path} has a LoRA branch or NF4 weights, so its "
                    "weight alone is not the head the model computes (TRL's fused LM head needs it plain)"
                )
        return head

    def enable_input_require_grads(self) -> None:
        """PEFT/transformers make the embedding output require grad so that reentrant
        checkpointing sees an input needing grad. lorafx's checkpoint_layers is non-reentrant:
        gradients reach LoRA without it, so there is nothing to switch on."""

    def disable_input_require_grads(self) -> None:
        """The inverse of enable_input_require_grads: nothing to undo (see there)."""

    @property
    def base_model(self) -> "Backbone":
        """The backbone (what `PreTrainedModel.base_model` is, e.g. LlamaModel): called with the
        model's inputs it returns the backbone's output (`last_hidden_state`), with LoRA, from a
        view over the same tensors. TRL's fused LM head runs it, then the output head."""
        self._require_hf("base_model")
        return Backbone(self)

    def get_base_model(self) -> torch.nn.Module:
        """The adapted model: PEFT's is the transformers model with its LoRA layers; lorafx's
        LoRA lives in this model's graph, so it is the LoraModel itself."""
        return self

    @contextlib.contextmanager
    def disable_adapter(self):
        """PeftModel.disable_adapter: `with lm.disable_adapter():` runs the base model."""
        with self.disable_adapters():
            yield

    # -- gradient (activation) checkpointing ---------------------------------------------
    @property
    def is_activation_checkpointing(self) -> bool:
        return getattr(self.spec, "checkpoint", None) == "layer"

    is_gradient_checkpointing = is_activation_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int | None = None, offload: bool | None = None) -> None:
        """transformers' activation checkpointing (what Trainer's gradient_checkpointing=True calls):
        the checkpoint_layers pass on the training graph in place, every decoder layer recomputed
        in the backward. lorafx's checkpointing is non-reentrant whatever `use_reentrant` says
        (the gradients are the same); every_n_layers other than 1 and offload are refused."""
        unknown = sorted(set(activation_checkpointing_kwargs or {}) - {"use_reentrant"})
        if unknown:
            raise ValueError(f"activation checkpointing kwargs {unknown} are not supported; lorafx takes use_reentrant only")
        if every_n_layers not in (None, 1) or offload:
            raise ValueError(
                f"every_n_layers={every_n_layers}, offload={offload}: lorafx checkpoints every layer "
                "(every_n_layers=1) and keeps activations on the device (offload=False)"
            )
        if not isinstance(self.spec, LoraSpec):
            raise NotImplementedError(f"activation checkpointing is for LoRA models, not a {type(self.spec).__name__}")
        if self.is_activation_checkpointing:
            return
        self.spec = dataclasses.replace(self.spec, checkpoint="layer")
        self.pass_results.append(checkpoint_layers(self.graph_module, self.spec))
        self.forget_views()  # views are captured with the spec's checkpointing

    def activation_checkpointing_disable(self) -> None:
        """Undo activation_checkpointing_enable (inline_checkpointed_layers)."""
        if not self.is_activation_checkpointing:
            return
        self.spec = dataclasses.replace(self.spec, checkpoint=None)
        self.pass_results.append(inline_checkpointed_layers(self.graph_module, self.spec))
        self.forget_views()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int | None = None, offload: bool | None = None) -> None:
        """The older name of activation_checkpointing_enable (PEFT and TRL call it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    # -- files -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        selected_adapters: list[str] | None = None, **kwargs) -> None:
        """PeftModel.save_pretrained: the "default" adapter in `save_directory`, every other named
        adapter in `save_directory/<name>`; PEFT format. Other PEFT/transformers keyword
        arguments (state_dict, safe_serialization, ...) are accepted and ignored: the adapter is
        always written from the model, as safetensors."""
        if not is_main_process:
            return
        names = self.adapter_names if self._adapters is not None else [named_adapters.DEFAULT]
        chosen = names if selected_adapters is None else list(selected_adapters)
        missing = sorted(set(chosen) - set(names))
        if missing:
            raise ValueError(f"selected_adapters {missing} are not loaded; the model has {names}")
        for name in chosen:
            folder = save_directory if name == named_adapters.DEFAULT else os.path.join(save_directory, name)
            self.save_adapter(folder, None if self._adapters is None else name)

    def _require_hf(self, what: str) -> None:
        if self.config is None:
            raise TypeError(f"{what} needs a Hugging Face model; this LoraModel wraps a {self.model_class}")


class Backbone:
    """`lm.base_model`: the backbone of a LoraModel, called like the transformers backbone."""

    def __init__(self, lm):
        self.lm = lm

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return self.lm.run_backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def __repr__(self):
        return f"Backbone({self.lm._blueprint.base_model_prefix} of {self.lm.model_class})"
