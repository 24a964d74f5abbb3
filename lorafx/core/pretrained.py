"""from_pretrained: a LoraModel from a Hugging Face checkpoint folder, streamed (NF4 on the fly).

`from_pretrained` never holds the full-precision model: parameters start as untouched
`torch.empty` placeholders (virtual memory only, so the model can be captured), then the
safetensors shards are read tensor by tensor and each weight that will be NF4 is quantized
as it arrives and its full-precision copy dropped. Peak memory stays near the NF4 model
plus one tensor. A checkpoint saved in bitsandbytes 4-bit format is loaded as is.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import sys

import torch
import transformers
from tqdm.auto import tqdm

from lorafx.formats.checkpoints import NF4_SUFFIXES, CheckpointError, checkpoint_index, open_shard, read_nf4
from lorafx.formats.files import locked_folder
from lorafx.formats.nf4 import quantize_nf4
from lorafx.passes import TRANSFORM_PASSES, match_linears, run_passes
from lorafx.passes.common import LINEAR
from lorafx.passes.quantize_nf4 import install_nf4

from .capture import capture, parameters_on_meta
from .model import LoraModel
from .spec import LoraSpec, dtype_named

# Files of a checkpoint folder that are not weights: `lorafx merge` copies them; any one of them means the folder has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "tokenizer.model", "added_tokens.json")


def tokenizer_of(directory: str):
    """The checkpoint's tokenizer, or None when the folder has none."""
    if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
        return None
    return transformers.AutoTokenizer.from_pretrained(directory)


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim") else None



def from_pretrained(directory, spec: LoraSpec, dtype: torch.dtype | None = None, progress: bool = True):
    """A LoraModel from a local HF checkpoint folder (config.json + safetensors shards).

    `dtype` is the dtype of the parameters that stay full precision, a torch dtype or its name
    (default or "auto": the config's dtype, else float32). Weights `spec.quantizes` are streamed straight to NF4.
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(
            f"from_pretrained takes a LoraSpec, got {type(spec).__name__}; for (IA)³ or VeRA load the "
            "model with transformers and call lorafx.transform(model, spec)"
        )
    directory = os.fspath(directory)
    with locked_folder(directory):  # config and shards of one save, also while save_quantized rewrites the folder
        return _load(directory, spec, dtype, progress)


def _load(directory, spec, dtype, progress):
    config = _read_config(directory)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
        if not (quantization.get("load_in_4bit") and quantization.get("bnb_4bit_quant_type") == "nf4"):
            raise CheckpointError(f"{directory}: only bitsandbytes NF4 4-bit checkpoints are read, got {quantization}")
        # The 4-bit weights are used as stored; skip what the checkpoint kept full precision.
        skip = quantization.get("llm_int8_skip_modules")
        spec = dataclasses.replace(spec, quantize="nf4", quantize_skip=skip if skip else spec.quantize_skip)
        del config.quantization_config
    if spec.init_from_weights and spec.quantize == "nf4":
        raise ValueError(
            f"LoraSpec.init={spec.init!r} computes A, B from the full-precision weights and rewrites them, "
            "but from_pretrained with NF4 quantizes each weight as it streams in (or reads a 4-bit "
            "checkpoint): load the model in float with transformers and call lorafx.transform(model, spec)"
        )
    if dtype is not None and dtype != "auto":  # "auto": the config's dtype, as transformers' torch_dtype="auto"
        dtype = dtype_named(dtype)
    else:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = dtype_named(dtype)
    with parameters_on_meta():
        model = _build_model(config)
    _placeholders(model, dtype)
    model.eval()
    captured = capture(model)
    gm = captured.graph_module
    spec = spec.resolved(captured.output_head, type(model).__name__)
    match_linears(gm, spec)
    sites = {n.meta[LINEAR].path: n.meta[LINEAR] for n in gm.graph.nodes if LINEAR in n.meta}
    _stream(gm, directory, spec, sites, dtype, progress)
    results = run_passes(gm, spec, TRANSFORM_PASSES)
    lm = LoraModel(captured, spec, model)
    lm.pass_results = results
    return lm.train(False)


def _build_model(config):
    """The class config.json names (BertForSequenceClassification, ...), else a causal LM."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def _read_config(directory):
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory!r} has no config.json: not a Hugging Face checkpoint folder")
    _check_config_dtype(os.path.join(directory, "config.json"))
    return transformers.AutoConfig.from_pretrained(directory)


def _check_config_dtype(path):
    """config.json's dtype names a floating dtype (transformers would fail on getattr(torch, name))."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # transformers' own error says what is wrong with the file
    for field in ("dtype", "torch_dtype"):
        if isinstance(raw, dict) and raw.get(field) is not None:
            dtype_named(raw[field], f"{path}: {field}")


def _placeholders(model, dtype):
    """Replace meta parameters by untouched CPU tensors, keeping tied parameters tied."""
    new: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
                module._parameters[name] = new[id(p)]


def _stream(gm, directory, spec, sites, dtype, progress):
    key_index = checkpoint_index(directory)
    params = dict(gm.named_parameters(remove_duplicate=False))
    prefix = _checkpoint_prefix(params, key_index)
    state_suffix = ".quant_state.bitsandbytes__nf4"
    nf4_keys = {k.removesuffix(state_suffix) for k in key_index if k.endswith(state_suffix)}
    by_shard: dict[str, list[str]] = {}
    for key, shard in key_index.items():
        if not any(key.endswith("." + s) for s in NF4_SUFFIXES):
            by_shard.setdefault(shard, []).append(key)
    filled: set[int] = set()
    bar = tqdm(total=sum(map(len, by_shard.values())), desc="loading", unit="tensor", disable=not progress)
    for shard, keys in by_shard.items():
        with open_shard(shard) as f:
            for key in keys:
                name = prefix + key
                site = sites.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
                if name not in params:
                    raise CheckpointError(f"{key} in {os.path.basename(shard)} is not a parameter of the model")
                if key in nf4_keys or (site is not None and spec.quantizes(site.path)):
                    # bitsandbytes stores every weight (Conv1D's too) as (out, in)
                    if key in nf4_keys:
                        weight = read_nf4(key_index, key)
                    else:
                        tensor = f.get_tensor(key).to(dtype)
                        _check_shape(key, tuple(tensor.shape), site, transposed=site.fan_in_fan_out)
                        try:
                            weight = quantize_nf4(
                                tensor.T if site.fan_in_fan_out else tensor, spec.blocksize, spec.double_quant
                            )
                        except ValueError as e:
                            raise CheckpointError(f"{key}: {e}") from e
                        del tensor
                    _check_shape(key, tuple(weight.shape), site, transposed=False)
                    install_nf4(gm.get_submodule(site.path), weight)
                    _release_freed_memory()
                else:
                    param, tensor = params[name], f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise CheckpointError(
                            f"{key} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                        )
                    param.data = tensor.to(dtype)
                filled.add(id(params[name]))
                bar.update(1)
    bar.close()
    missing = [n for n, p in params.items() if id(p) not in filled]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing[0]} ({len(missing)} parameters missing)")


def _release_freed_memory():
    """Hand the quantizer's freed temporaries back to the OS. glibc keeps freed heap chunks
    (sized below its adaptive mmap threshold) for reuse; interleaved with the small NF4
    tensors that stay, they pile up to ~40 MB per 100 MB shard (bench/bench_load_nf4.py)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _checkpoint_prefix(params, key_index) -> str:
    """GPT-2-style checkpoints saved from the base model omit its prefix ("transformer.")."""
    if any(k in params for k in key_index):
        return ""
    for name in params:
        head, _, rest = name.partition(".")
        if rest in key_index:
            return head + "."
    return ""


def _check_shape(key, shape, site, transposed):
    if site is None:
        raise CheckpointError(f"{key} is stored 4-bit but is not the weight of a linear layer")
    expected = (site.in_features, site.out_features) if transposed else (site.out_features, site.in_features)
    if shape != expected:
        raise CheckpointError(f"{key} has shape {shape}, the model expects {expected}")
