"""Hugging Face checkpoint folders: config.json + model.safetensors (or shards with
model.safetensors.index.json), in full precision or as transformers' bitsandbytes 4-bit
checkpoint (FORMATS.md). Reading goes through lorafx's own safetensors reader, which maps
one tensor at a time; writing through the atomic writer.
"""

from __future__ import annotations

import json
import os

import safetensors.torch
import torch

from .files import check_folder_path, write_atomically, write_text
from .nf4 import NF4Weight
from .safetensors_io import SafetensorsFile, SafetensorsFormatError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
NF4_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its config: the message names the first problem."""


def checkpoint_index(directory) -> dict[str, str]:
    """checkpoint key → shard file (every shard's header is read and checked to hold its keys)."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        return _read_index(directory, index)
    single = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(single):
        raise CheckpointError(f"{directory} has neither {WEIGHTS} nor {INDEX} (only safetensors are read)")
    with open_shard(single) as f:
        return {k: single for k in f.keys()}


def _read_index(directory: str, index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index} is not valid JSON: {e}") from e
    if not isinstance(content, dict) or not isinstance(content.get("weight_map"), dict):
        what = "no 'weight_map' field" if isinstance(content, dict) else f"a JSON {type(content).__name__}"
        raise CheckpointError(f"{index} holds {what}; expected an object with 'weight_map': {{key: shard file name}}")
    by_shard: dict[str, list[str]] = {}
    for key, shard in content["weight_map"].items():
        if not _name_inside(shard):
            raise CheckpointError(
                f"{index} maps {key!r} to {shard!r}: a shard must be a file name inside {directory} "
                "(a relative path without '..'); it was not opened"
            )
        by_shard.setdefault(os.path.join(directory, shard), []).append(key)
    for shard, keys in by_shard.items():
        with open_shard(shard) as f:
            missing = sorted(set(keys) - set(f.keys()))
        if missing:
            raise CheckpointError(f"{index} maps {missing[0]!r} to {os.path.basename(shard)}, which does not contain it")
    return {key: shard for shard, keys in by_shard.items() for key in keys}


def _name_inside(name) -> bool:
    """A relative path that stays in its folder, judged on the name alone (a symlink inside the
    folder, as in the Hugging Face cache, is the folder owner's choice and is followed)."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return False
    return ".." not in name.replace("\\", "/").split("/")


def open_shard(shard: str) -> SafetensorsFile:
    try:
        return SafetensorsFile(shard)
    except (SafetensorsFormatError, OSError) as e:
        raise CheckpointError(f"{shard} is not a readable safetensors file: {e}") from e


def read_nf4(key_index, key) -> NF4Weight:
    tensors = {}
    for k in [key] + [f"{key}.{s}" for s in NF4_SUFFIXES]:
        if k in key_index:
            with open_shard(key_index[k]) as f:
                tensors[k] = f.get_tensor(k)
    try:
        return NF4Weight.from_bnb_state_dict(tensors, key)
    except ValueError as e:
        raise CheckpointError(f"{key}: {e}") from e



def write_checkpoint(directory, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """config.json + model.safetensors, both renamed into place together (a bnb 4-bit
    checkpoint when `config` holds its quantization_config and `tensors` bnb's keys)."""
    directory = check_folder_path(directory, "checkpoint")
    if os.path.isfile(os.path.join(directory, INDEX)):
        raise CheckpointError(
            f"{directory} holds a sharded checkpoint ({INDEX}), which would still be what loads from it; "
            "write into an empty folder"
        )
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    write_atomically(
        {
            os.path.join(directory, WEIGHTS): lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"}),
            os.path.join(directory, "config.json"): write_text(json.dumps(config, indent=2, sort_keys=True, default=str)),
        }
    )


def bnb_quantization_config(double_quant: bool, compute_dtype: torch.dtype, skip_modules: list[str]) -> dict:
    """The quantization_config transformers writes for BitsAndBytesConfig(load_in_4bit=True, nf4)."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(set(skip_modules)) or None,
    }
