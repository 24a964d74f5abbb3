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

from .files import write_atomically, write_text
from .nf4 import NF4Weight
from .safetensors_io import SafetensorsFile, SafetensorsFormatError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
NF4_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its config: the message names the first problem."""


def checkpoint_index(directory) -> dict[str, str]:
    """checkpoint key → shard file."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return {k: os.path.join(directory, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(single):
        raise CheckpointError(f"{directory} has neither {WEIGHTS} nor {INDEX} (only safetensors are read)")
    with open_shard(single) as f:
        return {k: single for k in f.keys()}


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
    directory = os.fspath(directory)
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
