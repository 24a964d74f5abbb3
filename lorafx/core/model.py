"""transform() and LoraModel: the user-facing wrapper around the rewritten GraphModule."""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import warnings
from typing import Iterator

import torch

from lorafx.formats import adapters, checkpoints
from lorafx.passes import (
    TRANSFORM_PASSES,
    PassResult,
    graph_nodes,
    inline_checkpointed_layers,
    merge_lora,
    run_passes,
    unfuse_nf4_lora,
)
from lorafx.passes.adapter_bank import strip_lora, unbank
from lorafx.passes.common import LINEAR, LORA, LinearSite
from lorafx.passes.quantize_nf4 import STORAGE, NF4Storage
from lorafx.variants import SPECS, files_for, spec_for, variant_of
from lorafx.variants.ia3 import IA3Spec
from lorafx.variants.vera import VeraSpec

from . import named_adapters, views
from .capture import Captured, capture, skeleton
from .nf4_memory import saved_nf4_weights
from .peft_surface import PeftSurface
from .spec import LoraSpec

GRAPH_PREFIX = "graph_module."
FLASH_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _deepcopy(obj, memo=None):
    """copy.deepcopy minus one torch FutureWarning: fx's Graph.__deepcopy__ copies the graph's
    pytree LeafSpecs through their deprecated constructor (torch's own call, not ours)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        return copy.deepcopy(obj, memo)


def transform(
    model: torch.nn.Module,
    spec: LoraSpec | IA3Spec | VeraSpec,
    example_args=(),
    example_kwargs=None,
    dynamic_shapes=None,
) -> "LoraModel":
    """Capture `model`, run the pass pipeline and return a trainable LoraModel.

    Hugging Face models need no example inputs (one is made from the config, with dynamic
    batch and sequence length). Base parameters are frozen in place, as PEFT does.
    An IA3Spec or VeraSpec gives (IA)³ or VeRA instead of LoRA (the table in lorafx/variants).
    """
    if not isinstance(spec, SPECS):
        raise TypeError(f"spec must be a lorafx.LoraSpec, IA3Spec or VeraSpec, got {type(spec).__name__}")
    if isinstance(model, LoraModel):
        raise TypeError("model is already a LoraModel; transform the original model instead")
    _check_weights_present(model, spec)
    captured = capture(model, example_args, example_kwargs, dynamic_shapes)
    spec = spec.resolved(captured.output_head, type(model).__name__)
    variant = variant_of(spec)
    results = run_passes(captured.graph_module, spec, variant.passes if variant else TRANSFORM_PASSES)
    lm = LoraModel(captured, spec, model)
    lm.pass_results = results
    lm.train(model.training)
    return lm


def _check_weights_present(model: torch.nn.Module, spec) -> None:
    """A model whose weights an NF4 transform already emptied (it consumes the original, as PEFT
    does), or one on the meta device, has no weights to capture or quantize: say so by name."""
    emptied = [n for n, p in model.named_parameters() if p.numel() == 0 and p.dim() == 1 and "weight" in n]
    if emptied:
        raise ValueError(
            f"{type(model).__name__} was already transformed with quantize='nf4', which freed its weights "
            f"({emptied[0]} and {len(emptied) - 1} more are empty): transform a fresh copy of the model, or use "
            "the LoraModel the first transform returned"
        )
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta and getattr(spec, "quantize", None) == "nf4":
        raise ValueError(
            f"{type(model).__name__} has weights on the meta device ({meta[0]} and {len(meta) - 1} more): "
            "quantize='nf4' needs their values; load it with lorafx.from_pretrained(folder, spec), which "
            "quantizes while streaming the checkpoint"
        )


class LoraModel(PeftSurface, torch.nn.Module):
    """The captured model with LoRA branches: same call and output type as the original.

    For Hugging Face models `forward(input_ids, attention_mask=None, labels=None)` returns
    the model's own output class; with labels, `.loss` is the model's own loss function.
    PeftSurface adds what Trainer, TRL and PEFT users read from a PeftModel.
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
        self._adapters: dict[str, named_adapters.Adapter] | None = None  # None: one trainable adapter
        self._active: str | None = None
        self._disabled = False
        self._merged = False  # merge() output: no adapter left to insert
        # Not submodules (so state_dict and parameters() are graph_module's alone):
        self.__dict__["_blueprint"] = captured.blueprint  # the original model, meta parameters
        self.__dict__["_views"] = {}  # entry points over graph_module's tensors (entry_point)
        # modules_to_save train in place: their original weights, for disable_adapters() (as PEFT
        # keeps an original copy). Non-persistent buffers: they follow .to(), state_dict skips them.
        self.original_weights = torch.nn.Module()
        saves = getattr(spec, "saves", None)
        for name, p in self.graph_module.named_parameters():
            if saves is not None and saves(name.rpartition(".")[0]):
                self.original_weights.register_buffer(name.replace(".", ":"), p.detach().clone(), persistent=False)

    # -- calling ---------------------------------------------------------------------------
    def forward(self, *args, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                adapter_ids=None, num_items_in_batch=None, **kwargs):
        """`adapter_ids`: with named adapters loaded, one entry per batch row — an adapter
        name, its index in `adapter_names`, or "__base__" / -1 for the base model.
        `num_items_in_batch` (Trainer's gradient accumulation): the label count the model's own
        loss divides by, as transformers models take it. The inputs are named so that
        Trainer keeps those dataset columns."""
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        kwargs = {**{k: v for k, v in named.items() if v is not None}, **kwargs}
        if self.input_names is None:
            if labels is not None:
                raise TypeError("labels= is only supported for Hugging Face models")
            first = next((a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)), None)
            graph = self._graph(first.shape[0] if first is not None and first.dim() else 1, adapter_ids)
            with self._nf4_saved_as_nf4():
                return graph(*args, **kwargs)
        inputs = self._hf_inputs(args, kwargs)
        graph = self._graph(inputs["input_ids"].shape[0], adapter_ids, tuple(inputs))
        with self._nf4_saved_as_nf4():
            out = graph(**inputs)
        if labels is not None:
            if self._loss_function is None:
                raise TypeError(f"{type(self.config).__name__} model has no loss function for labels=")
            loss = self._loss(out["logits"], labels, inputs["input_ids"], num_items_in_batch)
            out = type(out)(loss=loss, **out)  # loss first, as the model itself returns it
        return out

    def run_backbone(self, **kwargs):
        """The backbone's output (`base_model`, e.g. LlamaModel's last_hidden_state) for these
        inputs, with LoRA (none inside disable_adapters()): a view over the same tensors."""
        inputs = self._hf_inputs((), kwargs)
        if self._adapters is not None:
            raise NotImplementedError("base_model (the backbone alone) is not available with named adapters loaded")
        key = ("backbone", tuple(inputs), self._disabled)
        graph = self.entry_point(key, lambda: views.backbone(self, tuple(inputs), self._disabled))
        with self._nf4_saved_as_nf4():
            return graph(**inputs)

    def _loss(self, logits, labels, ids, num_items_in_batch=None):
        """The model's own loss function, called as the model calls it for its task."""
        batch = ids.shape[0]
        if self.model_class.endswith("ForSequenceClassification"):  # one label (or a multi-label row) per sequence
            expected = f"({batch},) or ({batch}, num_labels={self.config.num_labels})"
            call = dict(pooled_logits=logits, config=self.config)
            fits = isinstance(labels, torch.Tensor) and labels.shape in ((batch,), (batch, self.config.num_labels))
        elif self.model_class.endswith("ForTokenClassification"):
            expected, call = f"{tuple(ids.shape)}, like input_ids", dict(logits=logits, config=self.config)
            fits = isinstance(labels, torch.Tensor) and labels.shape == ids.shape
        else:  # language models: next-token labels (GPT2LMHeadModel, *ForCausalLM)
            expected, call = f"{tuple(ids.shape)}, like input_ids", dict(logits=logits, vocab_size=self.config.vocab_size)
            fits = isinstance(labels, torch.Tensor) and labels.shape == ids.shape
        if not fits:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels has shape {got}; {self.model_class} expects {expected}")
        if num_items_in_batch is not None:
            call["num_items_in_batch"] = num_items_in_batch
        return self._loss_function(labels=labels, **call)

    def _nf4_saved_as_nf4(self):
        """QLoRA training, eager: autograd keeps NF4 weights 4-bit (lorafx/core/nf4_memory.py)."""
        if getattr(self.spec, "quantize", None) == "nf4" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return saved_nf4_weights()
        return contextlib.nullcontext()

    def _graph(self, batch: int, adapter_ids, inputs=None) -> torch.fx.GraphModule:
        """The graph to run: the base model's inside disable_adapters(), else the LoRA graph
        with its per-row adapter slots written; a view captured with other inputs
        (position_ids) when the call has them."""
        if self._disabled and adapter_ids is not None:
            raise ValueError("adapter_ids= cannot be used inside disable_adapters()")
        if inputs is not None and inputs != self.input_names:
            key = ("inputs", inputs, self._disabled)
            graph = self.entry_point(key, lambda: views.with_inputs(self, inputs, self._disabled))
        elif self._disabled:
            return self._base_graph()
        else:
            graph = self.graph_module
        if not self._disabled and (self._adapters is not None or adapter_ids is not None):
            named_adapters.write_ids(self, batch, adapter_ids, gm=graph)
        return graph

    # -- entry points over one parameter store ---------------------------------------------
    # graph_module owns every parameter and buffer (it is the store: state_dict, optimizers
    # and adapters see it). Other graphs of the same model — the base model behind
    # disable_adapters(), the KV-cache decode graph behind generate() — are views: built on
    # first use, holding graph_module's very tensors, dropped when the store changes shape.
    def entry_point(self, key, build) -> torch.fx.GraphModule:
        """The view `key`, built by `build()` the first time it is asked for."""
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = build()
        return view.train(self.training)

    def forget_views(self) -> None:
        """Drop every view: the store's tensors moved or its adapters changed structure."""
        self._views.clear()

    def _base_graph(self) -> torch.fx.GraphModule:
        """graph_module without LoRA: a copy of the graph and modules sharing every parameter
        and buffer (no weight is copied)."""

        def build():
            shared = {id(t): t for t in itertools.chain(self.graph_module.parameters(), self.graph_module.buffers())}
            view = _deepcopy(self.graph_module, shared)
            variant = variant_of(self.spec)
            (variant.strip if variant else strip_lora)(view)
            views.use_original_weights(self, view)
            return view

        return self.entry_point("base", build)

    def _apply(self, fn, *args, **kwargs):
        self.forget_views()
        return super()._apply(fn, *args, **kwargs)

    def _hf_inputs(self, args, kwargs):
        if args:
            if len(args) > 1:
                raise TypeError("pass inputs other than input_ids by keyword")
            kwargs = {"input_ids": args[0], **kwargs}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.pop("return_dict", None)  # the graph always returns the model's output class
        if kwargs.pop("output_attentions", False) or kwargs.pop("output_hidden_states", False):
            raise TypeError("output_attentions / output_hidden_states are not supported: the graph returns the model's outputs only")
        if kwargs.pop("use_cache", False):
            raise TypeError("use_cache=True is not supported: the graph was captured without a KV cache")
        if "position_ids" in kwargs:
            # Packing collators (TRL's) also describe the documents for flash attention; transformers'
            # sdpa/eager attention reads the same documents from position_ids and ignores these.
            for key in FLASH_PACKING_KWARGS:
                kwargs.pop(key, None)
        unknown = sorted(set(kwargs) - set(self.input_names) - {"position_ids"})
        if unknown:
            raise TypeError(
                f"LoraModel got unsupported inputs {unknown}; the captured graph takes "
                f"{list(self.input_names)} (and labels=, position_ids=)"
            )
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor (batch, sequence)")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {ids.dtype}")
        if 0 in ids.shape:
            raise ValueError(f"input_ids has shape {tuple(ids.shape)}: batch and sequence length must be >= 1")
        kwargs["input_ids"] = ids = self._checked_ids(ids)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a tensor like input_ids, got {type(mask).__name__}")
            kwargs["attention_mask"] = mask.long()  # bool / int32 masks, as transformers takes them
        if "position_ids" in kwargs:
            return self._with_positions(ids, kwargs)
        if "attention_mask" in self.input_names and "attention_mask" not in kwargs:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if kwargs["attention_mask"].shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(kwargs['attention_mask'].shape)} != input_ids shape {tuple(ids.shape)}"
            )
        return kwargs

    def _checked_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """input_ids as int64 (int32 ids are taken, as transformers takes them), each a token of the
        vocabulary, the sequence no longer than the position limit the graph was captured for
        (GPT-2's position table; RoPE models are bounded by max_position_embeddings too).
        One min/max: cheap beside the model."""
        text = self.config.get_text_config()
        limit = getattr(text, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] > limit:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens; {self.model_class} takes at most "
                             f"max_position_embeddings={limit}")
        vocab = getattr(text, "vocab_size", None)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return ids.long()  # traced (torch.compile, export): the values are not known; the eager call checks them
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or (vocab is not None and high >= vocab):
            bad = low if low < 0 else high
            raise ValueError(f"input_ids holds token id {bad}; the vocabulary has vocab_size={vocab} ids (0..{vocab - 1})")
        return ids.long()

    def _with_positions(self, ids, kwargs):
        """Inputs with position_ids, in the order the view takes them. As in transformers,
        position_ids without an attention_mask mark packed sequences: a token attends only to
        the tokens of its own document (positions restart at 0 where a document begins)."""
        positions = kwargs["position_ids"]
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != ids.shape[1] \
                or positions.shape[0] not in (1, ids.shape[0]):
            got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise ValueError(f"position_ids has shape {got}; input_ids is {tuple(ids.shape)}: give (batch or 1, sequence)")
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"position_ids must hold integer positions, got {positions.dtype}")
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if positions.numel() and (int(positions.min()) < 0 or (limit is not None and int(positions.max()) >= limit)):
            raise ValueError(f"position_ids must lie in 0..{limit - 1 if limit else 'max'}, got {int(positions.min())}..{int(positions.max())}")
        out = {"input_ids": ids}
        if "attention_mask" in kwargs:
            if kwargs["attention_mask"].shape != ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(kwargs['attention_mask'].shape)} != input_ids shape {tuple(ids.shape)}"
                )
            out["attention_mask"] = kwargs["attention_mask"]
        out["position_ids"] = positions.long().expand(ids.shape[0], -1)
        return out

    # -- parameters ------------------------------------------------------------------------
    def named_lora_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """LoRA parameters with PEFT-style names: `model.layers.0.self_attn.q_proj.lora_A.weight`
        (with an IA3Spec the (IA)³ vectors `<path>.ia3_l`, with a VeraSpec `<path>.vera_lambda_b` / `_d`)."""
        suffixes = (".lora_magnitude_vector", ".ia3_l", ".vera_lambda_b", ".vera_lambda_d")
        saves = getattr(self.spec, "saves", None)  # modules_to_save: trained in full
        for name, p in self.graph_module.named_parameters():
            if ".lora_A." in name or ".lora_B." in name or name.endswith(suffixes):
                yield name, p
            elif saves is not None and saves(name.rpartition(".")[0]):
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
    def save_adapter(self, directory: str | os.PathLike, name: str | None = None, convert_from=None) -> None:
        """Write adapter_model.safetensors + adapter_config.json exactly as PEFT does: the
        model's adapter, or with named adapters loaded the one called `name` (default: active).

        `convert_from`: the adapter folder saved right after transform with init="pissa":
        writes the trained update as a plain rank-2r LoRA adapter for the original base
        model (PEFT's path_initial_model_for_weight_conversion)."""
        if convert_from is not None:
            if self._adapters is not None or variant_of(self.spec) is not None:
                raise ValueError("convert_from= converts the model's own LoRA adapter (no named adapters, no IA3/VeRA)")
            adapters.write_adapter(directory, *adapters.converted_to_lora(self, convert_from))
        elif self._adapters is None:
            if name not in (None, named_adapters.DEFAULT):
                named_adapters.set_active(self, name)  # raises KeyError naming the adapters
            files_for(self.spec).save_adapter(self, directory)
        else:
            adapters.write_adapter(directory, *named_adapters.adapter_state(self, name))

    def load_adapter(self, directory: str | os.PathLike, name: str | None = None) -> None:
        """Load an adapter saved by lorafx or PEFT; checks config, keys and shapes first.

        Without `name` it replaces the model's own (trainable) adapter, which must have the
        model's r, alpha and targets. With `name` it joins the model's adapters as a frozen,
        named one (any rank, alpha and targets; plain LoRA): choose it with set_adapter or
        per batch row with `adapter_ids=`. The first named load freezes the model's own
        adapter as "default".
        """
        if name is None:
            if self._adapters is not None:
                raise ValueError("this model holds named adapters; give load_adapter a name")
            files_for(self.spec).load_adapter(self, directory)
        elif variant_of(self.spec) is not None:
            kind = type(self.spec).__name__
            raise adapters.AdapterError(f"named adapters are LoRA only; this model has a {kind}: load_adapter(dir)")
        else:
            named_adapters.load_named(self, directory, name)

    @classmethod
    def from_pretrained(cls, model: torch.nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> "LoraModel":
        """PEFT's PeftModel.from_pretrained: `model` transformed with the spec of the adapter in
        `adapter_dir` (LoRA, (IA)³ or VeRA, saved by lorafx or PEFT) and that adapter loaded. As
        in PEFT, the adapter is frozen and the model in eval mode unless `is_trainable`."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"LoraModel.from_pretrained takes the base model (an nn.Module), got {type(model).__name__}; "
                "to stream a checkpoint folder use lorafx.from_pretrained(folder, LoraSpec.from_peft_config(adapter_dir))"
            )
        lm = transform(model, spec_for(adapter_dir))
        lm.load_adapter(adapter_dir)
        if not is_trainable:
            for _, p in lm.named_lora_parameters():
                p.requires_grad_(False)
            lm.eval()
        return lm

    @property
    def adapter_names(self) -> list[str]:
        """Loaded adapters in slot order (the index `adapter_ids` integers refer to)."""
        return named_adapters.names(self)

    @property
    def active_adapter(self) -> str | None:
        return named_adapters.DEFAULT if self._adapters is None else self._active

    def set_adapter(self, name: str) -> None:
        """Use adapter `name` for every row from now on (writes a buffer: no re-capture, same graph)."""
        named_adapters.set_active(self, name)

    def delete_adapter(self, name: str) -> None:
        """Unload a named adapter; if it was active the first remaining one becomes active."""
        named_adapters.delete(self, name)

    @contextlib.contextmanager
    def disable_adapters(self):
        """`with lm.disable_adapters():` calls run the base model (PEFT's disable_adapter);
        gradients still reach the LoRA parameters of calls made outside the block."""
        previous, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = previous

    @property
    def generation_config(self):
        """The original model's transformers GenerationConfig (generate's defaults), or None."""
        return getattr(self._blueprint, "generation_config", None)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Token ids (prompt + new tokens), as transformers' `generate` returns them.

        Decodes with a static KV cache on a second graph of this model (captured on first use,
        over the same tensors: LoRA, NF4, named adapters and disable_adapters() apply as in
        forward). Arguments: max_new_tokens (or max_length), do_sample, temperature, top_k,
        top_p, eos_token_id (int or list), pad_token_id, generator (torch.Generator for
        sampling), adapter_ids (one per row, with named adapters), streamer (transformers'
        TextStreamer protocol), compile (the decode graph through torch.compile with backend
        "lorafx"); defaults come from `generation_config`. attention_mask marks left padding,
        as in transformers.
        """
        from lorafx.generation.generate import generate  # generation builds on core: import at call time

        return generate(self, input_ids, attention_mask, **kwargs)

    def save_quantized(self, directory: str | os.PathLike) -> None:
        """The base model as a transformers bitsandbytes 4-bit checkpoint folder: config.json with
        its quantization_config and model.safetensors with bnb's keys (LoRA goes in save_adapter)."""
        if self.config is None:
            raise TypeError("save_quantized needs a Hugging Face model (it writes config.json)")
        gm = self.graph_module
        tensors: dict[str, torch.Tensor] = {}
        skip: list[str] = []
        for path in self.linear_sites():
            owner = gm.get_submodule(path)
            if hasattr(owner, STORAGE):
                tensors.update(owner.get_submodule(STORAGE).nf4_weight().to_bnb_state_dict(f"{path}.weight"))
            else:
                skip.append(path.rsplit(".", 1)[-1])
        lora = dict(self.named_lora_parameters())
        tensors.update({name: p.detach() for name, p in gm.named_parameters() if name not in lora})
        config = self.config.to_dict()
        compute = self.spec.compute_dtype or next(iter(self.linear_sites().values())).dtype
        config["quantization_config"] = checkpoints.bnb_quantization_config(self.spec.double_quant, compute, skip)
        checkpoints.write_checkpoint(directory, tensors, config)

    def merge(self) -> "LoraModel":
        """A copy with scale·B·A folded into the base weights and no LoRA nodes or parameters.

        `self` is left as it was, so there is no unmerge: keep training or saving the
        unmerged model and call merge() again when you need a deployable copy.
        """
        views, self.__dict__["_views"] = self._views, {}  # views are rebuilt, not copied
        try:
            merged = _deepcopy(self)
        finally:
            self.__dict__["_views"] = views
        merged._merged = True
        variant = variant_of(self.spec)
        if variant is not None:  # (IA)³ / VeRA: their own merge pass
            merged.pass_results = [variant.merge(merged.graph_module, self.spec)]
            return merged
        if self._adapters is not None:  # named adapters: merge the active one
            adapter = self._adapters[self._active]
            slot = self.adapter_names.index(self._active)
            merged.pass_results = [
                unbank(merged.graph_module, slot, adapter.r, adapter.scale),
                merge_lora(merged.graph_module, self.spec),
            ]
            merged._adapters, merged._active = None, None
            merged._untie_config()
            return merged
        # merge_lora reads insert_lora's flat subgraph: undo checkpointing and fusion first.
        merged.pass_results = [
            inline_checkpointed_layers(merged.graph_module, self.spec),
            unfuse_nf4_lora(merged.graph_module, self.spec),
            merge_lora(merged.graph_module, self.spec),
        ]
        merged._untie_config()
        return merged

    def _untie_config(self) -> None:
        """After a merge gave a tied layer (lm_head) a weight of its own: the config says so, so
        that save_pretrained writes both and from_pretrained does not tie them again."""
        if not any(r.counts.get("untied") for r in self.pass_results) or self.config is None:
            return
        warnings.warn("merge: the LoRA-adapted output embeddings are no longer tied to the input embeddings; "
                      "setting config.tie_word_embeddings=False (as PEFT's merge_and_unload does)")
        for config in {id(c): c for c in (self.config, self.config.get_text_config())}.values():
            config.tie_word_embeddings = False

    def merge_and_unload(self) -> torch.nn.Module:
        """A new instance of the original model class (a transformers model: `generate`,
        `save_pretrained` work) with the adapter folded into its weights, as PEFT's
        merge_and_unload returns. It shares no tensor with `self`: training either does not
        change the other. From a QLoRA model every weight comes back dequantized, in the
        compute dtype (bitsandbytes' dequantize, as PEFT's merge of a 4-bit model does)."""
        merged = self.merge()
        store = merged.graph_module
        compute = getattr(self.spec, "compute_dtype", None)
        for name, module in list(store.named_modules()):
            if isinstance(module, NF4Storage):  # a quantized layer without an adapter: dequantize it
                owner = store.get_submodule(name.rpartition(".")[0])
                weight = module.nf4_weight().dequantize().to(compute or module.dtype)
                if tuple(weight.shape) != tuple(self._blueprint.get_submodule(name.rpartition(".")[0]).weight.shape):
                    weight = weight.T.contiguous()  # Conv1D keeps W as (in, out); NF4 holds Wᵀ
                delattr(owner, STORAGE)
                owner.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))
        model = skeleton(self._blueprint, store)
        if merged.config is not None and not merged.config.tie_word_embeddings:
            model.config.tie_word_embeddings = model.config.get_text_config().tie_word_embeddings = False
        missing = [n for n, p in model.named_parameters() if p.stride() and 0 in p.stride() and p.numel() > 1]
        if missing:
            raise RuntimeError(f"merge_and_unload: no merged tensor for {missing[0]} ({len(missing)} parameters)")
        return model.train(self.training)


def print_trainable_parameters(model: torch.nn.Module) -> None:
    """Print the counts in PEFT's `print_trainable_parameters` format."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # deduplicated, so tied embeddings count once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
