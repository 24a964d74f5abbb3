"""lorafx.export: a LoraModel as a torch.export program (.pt2) or an AOTInductor package.

    lorafx.export(lm.merge(), "model.pt2", {"input_ids": ids})
    ep = torch.export.load("model.pt2"); ep.module()(input_ids=ids)["logits"]

A merged model's program holds aten ops only, so it loads where lorafx is not installed.
For a Hugging Face model the program returns `{"logits": tensor}`: `torch.export.load`
cannot rebuild HF ModelOutput classes, and a plain dict loads anywhere.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Mapping

import torch

from lorafx.core.capture import auto_dynamic_shapes, hf_dynamic_shapes
from lorafx.core.model import LoraModel
from lorafx.formats.files import write_atomically
from lorafx.passes import graph_nodes

from .decode import INPUTS, capture_decoder

LORA_CHOICES = (None, "keep")
QUANTIZE_CHOICES = (None, "keep")


class ExportError(ValueError):
    """The model or its example inputs cannot be exported as asked."""


class _Logits(torch.nn.Module):
    """What an HF model's program runs: LoraModel's own input handling, then plain outputs."""

    def __init__(self, model: LoraModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.model(input_ids, attention_mask=attention_mask).logits}


class _DecodeLogits(torch.nn.Module):
    """What a kv_cache program runs: the decode graph (cache buffers updated in place)."""

    def __init__(self, decoder: torch.fx.GraphModule):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        return {"logits": self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, cache_position=cache_position)}


def export(
    module: LoraModel,
    path: str | os.PathLike,
    example_inputs,
    dynamic: bool = True,
    aot_inductor: bool = False,
    lora: str | None = None,
    quantize: str | None = None,
    kv_cache: bool = False,
    cache_len: int | None = None,
) -> str:
    """Write `module` (in eval mode) to `path` and return the path.

    example_inputs: for a Hugging Face model, the input_ids tensor or a dict with
        "input_ids" and optionally "attention_mask"; the program takes the same keyword
        inputs (without attention_mask it attends to every token). For other models, a
        tensor or a tuple of the model's positional inputs.
    dynamic: batch and sequence length of an HF model's inputs stay symbolic (the example
        needs both >= 2: torch.export fixes sizes 0 and 1); for other models every dim
        torch.export can keep symbolic does (Dim.AUTO). False fixes the example's shapes.
    aot_inductor: write an AOTInductor package (load it with
        `torch._inductor.aoti_load_package`) instead of a torch.export program.
    lora: None refuses a model that still has LoRA branches (call `merge()` first);
        "keep" exports the branches as they are (extra matmuls per layer, aten ops only).
    quantize: None refuses a graph that calls lorafx ops such as `lorafx::nf4_dequant`
        (left by lora="keep" on a QLoRA model, or by layers quantized without LoRA), since
        such a program only loads where `import lorafx` has registered them. "keep" exports
        the NF4 storage and the op as they are: exactly the model that was trained, at
        ~4.1 bits per weight; loading it needs `import lorafx` first. Not supported with
        aot_inductor. Requantizing merged weights is not offered: it rounds W_nf4 + ΔW to
        the NF4 grid a second time, and for a 1024×1024 Gaussian weight with a LoRA update
        of 2.5% of its norm that rounding error measured 1.08× the update itself.

    kv_cache: for a Hugging Face causal LM, a decoder with a static KV cache for the example's
        batch size and `cache_len` positions (default: max_position_embeddings, at most 2048),
        held as buffers the program updates in place. One program runs the prefill and each
        step: program(input_ids=(B, S), attention_mask=(B, cache_len), position_ids=(B, S),
        cache_position=(S,)) → {"logits": (B, S, vocab)}; attention_mask is 1 where the cache
        holds a real token (prompt and generated so far), 0 elsewhere (see the README's decode
        loop). S is dynamic (1..cache_len), the batch size fixed.

    Returns `{"logits": tensor}` for a Hugging Face model (plain outputs: torch.export.load
    cannot rebuild HF ModelOutput classes), otherwise what the model's forward returns.

    The file is written to a temp file beside `path` and renamed into place, so a failed
    export leaves an existing file untouched.
    """
    if not isinstance(module, LoraModel):
        raise TypeError(
            f"lorafx.export takes a LoraModel (from lorafx.transform, usually .merge()d), got {type(module).__name__}"
        )
    path = os.fspath(path)
    _check_choices(path, dynamic, aot_inductor, lora, quantize)
    if not isinstance(kv_cache, bool):
        raise ExportError(f"kv_cache={kv_cache!r} is invalid: allowed is True or False")
    _check_graph(module, aot_inductor, lora, quantize)
    was_training = module.training
    module.eval()  # dropout off: a deployed program is an inference program
    if kv_cache and aot_inductor:
        raise ExportError(
            "kv_cache=True with aot_inductor=True is refused: AOTInductor (torch 2.13) compiles the static-cache "
            "decoder to wrong logits on batches with padding (measured 0.28 off; torch.export and torch.compile "
            "of the same program are exact). Export the program and torch.compile its module() instead"
        )
    try:
        if kv_cache:
            ep = _export_decoder(module, example_inputs, cache_len)
        elif cache_len is not None:
            raise ExportError("cache_len is the KV cache's length: it needs kv_cache=True")
        elif module.input_names is None:
            ep = _export_plain(module, example_inputs, dynamic)
        else:
            ep = _export_hf(module, example_inputs, dynamic)
    finally:
        module.train(was_training)
    if aot_inductor:
        write_atomically({path: lambda tmp: torch._inductor.aoti_compile_and_package(ep, package_path=tmp)})
    else:
        write_atomically({path: lambda tmp: torch.export.save(ep, tmp)})
    return path


def _check_choices(path, dynamic, aot_inductor, lora, quantize) -> None:
    if not path.endswith(".pt2"):
        raise ExportError(f"path={path!r} is invalid: torch.export programs and AOTInductor packages are .pt2 files")
    for name, value in (("dynamic", dynamic), ("aot_inductor", aot_inductor)):
        if not isinstance(value, bool):
            raise ExportError(f"{name}={value!r} is invalid: allowed is True or False")
    if lora not in LORA_CHOICES:
        raise ExportError(f"lora={lora!r} is invalid: allowed is None (model must be merged) or 'keep'")
    if quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"quantize={quantize!r} is invalid: allowed is None (no lorafx ops) or 'keep'")


def _check_graph(module: LoraModel, aot_inductor, lora, quantize) -> None:
    """Refuse what would silently give a different deployment than the user expects."""
    paths = module.lora_paths()
    if paths and lora is None:
        raise ExportError(
            f"the model still has LoRA branches on {len(paths)} layers ({paths[0]}, ...): call "
            "lm.merge() and export the result (LoRA folded into the weights), or pass lora='keep' "
            "to export the branches as they are"
        )
    ops = Counter(
        node.target.name()
        for node in graph_nodes(module.graph_module)
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "lorafx"
    )
    found = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
    if ops and quantize is None:
        raise ExportError(
            f"the graph calls lorafx ops ({found}), so the program would load only where lorafx is "
            "imported. Pass quantize='keep' to export the NF4 weights and ops as they are; a "
            "merge() of a model whose every quantized layer has LoRA has none left"
        )
    if quantize == "keep" and not ops:
        raise ExportError("quantize='keep' was given but the graph has no NF4 weights (lorafx ops) to keep")
    if quantize == "keep" and aot_inductor:
        raise ExportError(
            f"quantize='keep' is not supported with aot_inductor=True (the package would call lorafx ops: "
            f"{found}); export the torch.export program instead"
        )


def _export_hf(module: LoraModel, example_inputs, dynamic: bool) -> torch.export.ExportedProgram:
    inputs = {"input_ids": example_inputs} if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, Mapping):
        raise ExportError(
            f"example_inputs for a {module.model_class} is the input_ids tensor or a dict of keyword "
            f"inputs, got {type(example_inputs).__name__}"
        )
    accepted = [n for n in ("input_ids", "attention_mask") if n in module.input_names]
    unknown = sorted(set(inputs) - set(accepted))
    if unknown or "input_ids" not in inputs:
        raise ExportError(
            f"example_inputs has keys {sorted(inputs)}; the model takes {accepted} (input_ids required)"
        )
    ids = inputs["input_ids"]
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape != ids.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ExportError(
                f"example_inputs[{name!r}] is {got}; expected a 2-D (batch, sequence) tensor "
                f"shaped like input_ids {tuple(ids.shape)}"
            )
    if ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise ExportError(f"example_inputs['input_ids'] is {ids.dtype}; expected integer token ids")
    shapes = None
    if dynamic:
        if min(ids.shape) < 2:
            raise ExportError(
                f"example input_ids has shape {tuple(ids.shape)}; with dynamic=True use batch and sequence "
                "sizes >= 2 (torch.export fixes dims of size 0 or 1), or pass dynamic=False"
            )
        shapes = hf_dynamic_shapes(module.config, inputs)
    return torch.export.export(_Logits(module), (), dict(inputs), dynamic_shapes=shapes, strict=False)


def _export_decoder(module: LoraModel, example_inputs, cache_len) -> torch.export.ExportedProgram:
    if module.input_names is None or module.generation_config is None:
        raise ExportError(f"kv_cache=True exports a causal language model's decoder; {module.model_class} is not one")
    ids = example_inputs.get("input_ids") if isinstance(example_inputs, Mapping) else example_inputs
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ExportError("example_inputs for kv_cache=True is an input_ids tensor (batch, prompt): its batch size is the program's")
    limit = getattr(module.config.get_text_config(), "max_position_embeddings", None) or 2048
    cache_len = min(limit, 2048) if cache_len is None else cache_len
    if isinstance(cache_len, bool) or not isinstance(cache_len, int) or not 1 <= cache_len <= limit:
        raise ExportError(f"cache_len={cache_len!r} is invalid: an integer from 1 to max_position_embeddings ({limit})")
    decoder = _DecodeLogits(capture_decoder(module, ids.shape[0], cache_len))
    batch, seq = ids.shape[0], min(max(ids.shape[1], 2), cache_len)
    example = {
        "input_ids": torch.zeros(batch, seq, dtype=torch.long, device=ids.device),
        "attention_mask": torch.ones(batch, cache_len, dtype=torch.long, device=ids.device),
        "position_ids": torch.arange(seq, device=ids.device).expand(batch, seq),
        "cache_position": torch.arange(seq, device=ids.device),
    }
    step = torch.export.Dim("seq", min=1, max=cache_len)
    shapes = {"input_ids": {1: step}, "attention_mask": None, "position_ids": {1: step}, "cache_position": {0: step}}
    assert tuple(example) == INPUTS
    return torch.export.export(decoder, (), example, dynamic_shapes=shapes, strict=False)


def _export_plain(module: LoraModel, example_inputs, dynamic: bool) -> torch.export.ExportedProgram:
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    gm = module.graph_module
    if not isinstance(args, tuple):
        raise ExportError(
            f"example_inputs for a {module.model_class} is a tensor or a tuple of its positional inputs, "
            f"got {type(example_inputs).__name__}"
        )
    signature = inspect.signature(gm.forward)
    try:
        signature.bind(*args)
    except TypeError as e:
        raise ExportError(f"example_inputs do not match {module.model_class}.forward{signature}: {e}") from None
    shapes = auto_dynamic_shapes(args) if dynamic else None
    return torch.export.export(gm, args, dynamic_shapes=shapes, strict=False)
