"""Named adapters on one LoraModel: load, choose per model or per batch row, delete.

The first named adapter turns the LoraModel into a bank graph (passes/adapter_bank.py): the
adapter the model was transformed with becomes "default", and every adapter is frozen — a
bank serves adapters; train each one on its own LoraModel. Adapters may differ in rank,
alpha, rsLoRA and target layers. `lora_adapter_ids`, one slot per batch row, picks them.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from lorafx.passes.adapter_bank import IDS, add_banks, banks, strip_lora

from lorafx.formats.adapters import (
    CONFIG_NAME,
    KEY_PREFIX,
    AdapterError,
    check_base,
    in_dtype,
    peft_config,
    read_adapter,
)

DEFAULT = "default"  # PEFT's name for the adapter a model is created with
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclasses.dataclass
class Adapter:
    config: dict  # adapter_config.json, as PEFT writes it
    r: int
    scale: float


def to_bank(lm) -> None:
    """Single-adapter graph → bank graph holding the current adapter as "default"."""
    if lm._adapters is not None:
        return
    if lm.spec.use_dora:
        raise AdapterError("named adapters need plain LoRA: this model uses DoRA, whose magnitude vectors a bank cannot hold")
    config = peft_config(lm)
    gm = lm.graph_module
    weights = {}
    for path in lm.lora_paths():
        owner = gm.get_submodule(path)
        weights[path] = (owner.lora_A.weight.detach().clone(), owner.lora_B.weight.detach().clone())
    strip_lora(gm)
    add_banks(gm, set(weights))
    for path, bank in banks(gm):
        bank.append(*weights[path], lm.spec.scale)
    lm._adapters = {DEFAULT: Adapter(config, lm.spec.r, lm.spec.scale)}
    lm._active = DEFAULT
    lm.forget_views()


def load_named(lm, directory, name: str) -> None:
    """Check the adapter against the model completely, then add it to every bank."""
    if not isinstance(name, str) or not name or name == BASE:
        raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
    if lm._adapters is not None and name in lm._adapters:
        raise AdapterError(f"an adapter named {name!r} is already loaded; delete_adapter({name!r}) first")
    if lm._adapters is None and name == DEFAULT:
        raise AdapterError(f"{DEFAULT!r} is the model's own adapter; load_adapter(dir) without a name replaces it")
    directory = os.fspath(directory)
    config, tensors = read_adapter(directory)  # one save's pair, under the folder's lock
    if config.get("use_dora"):
        raise AdapterError(f"{directory}: a DoRA adapter cannot join a bank of named adapters (plain LoRA only)")
    check_base(config, lm.spec.init, os.path.join(directory, CONFIG_NAME), lm.spec.loftq_iter)
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    pairs = _pairs(tensors, lm.linear_sites(), r, directory)
    to_bank(lm)
    gm = lm.graph_module
    banked = {path for path, _ in banks(gm)}
    add_banks(gm, set(pairs) - banked)
    for path, bank in banks(gm):
        if path not in banked:  # a new bank: zero slots for the adapters already loaded
            for _ in lm._adapters:
                bank.append(None, None, 0.0)
        bank.append(*pairs.get(path, (None, None)), scale)
    lm._adapters[name] = Adapter(config, r, scale)
    lm.forget_views()  # views hold the banks they were built with


def _pairs(tensors, sites, r, directory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key[len(KEY_PREFIX) :].replace(".default.", ".") if key.startswith(KEY_PREFIX) else ""
        path, _, kind = name.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise AdapterError(f"{directory}: unexpected key {key!r}; a named adapter holds only lora_A/lora_B weights")
        if path not in sites:
            raise AdapterError(f"{directory}: {key} adapts {path!r}, which is not a linear layer of this model")
        found.setdefault(path, {})[kind[0]] = value
    if not found:
        raise AdapterError(f"{directory}: the adapter holds no LoRA weights")
    pairs = {}
    for path, ab in sorted(found.items()):
        site = sites[path]
        for kind, shape in (("A", (r, site.in_features)), ("B", (site.out_features, r))):
            if kind not in ab:
                raise AdapterError(f"{directory}: {path} has no lora_{kind}.weight")
            if tuple(ab[kind].shape) != shape:
                raise AdapterError(
                    f"{directory}: {KEY_PREFIX}{path}.lora_{kind}.weight has shape {tuple(ab[kind].shape)}, "
                    f"expected {shape} (r={r})"
                )
            ab[kind] = in_dtype(ab[kind], site.dtype, f"{directory}: {KEY_PREFIX}{path}.lora_{kind}.weight")
        pairs[path] = (ab["A"], ab["B"])
    return pairs


def names(lm) -> list[str]:
    return [DEFAULT] if lm._adapters is None else list(lm._adapters)


def _slot(lm, name) -> int:
    if name not in names(lm):
        raise KeyError(f"no adapter named {name!r}; loaded: {names(lm)}")
    return names(lm).index(name)


def set_active(lm, name: str) -> None:
    _slot(lm, name)
    if lm._adapters is not None:
        lm._active = name


def delete(lm, name: str) -> None:
    slot = _slot(lm, name)
    if lm._adapters is None or len(lm._adapters) == 1:
        raise ValueError(f"{name!r} is the model's only adapter and cannot be deleted; use disable_adapters() for the base model")
    for _, bank in banks(lm.graph_module):
        bank.remove(slot)
    del lm._adapters[name]
    if lm._active == name:
        lm._active = next(iter(lm._adapters))


def adapter_state(lm, name: str | None) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT file contents (tensors, config) of a named adapter (the active one for None)."""
    name = lm._active if name is None else name
    slot, adapter = _slot(lm, name), lm._adapters[name]
    tensors = {}
    for path, bank in banks(lm.graph_module):
        pair = bank.slot(slot, adapter.r)
        if pair is not None:
            tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = pair[0].to("cpu").contiguous()
            tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = pair[1].to("cpu").contiguous()
    return tensors, adapter.config


@torch.compiler.disable  # host-side checks and names → slots; compiled graphs read the buffer it writes
def write_ids(lm, batch: int, adapter_ids, gm=None) -> None:
    """Set the per-row adapter slots of `gm` (default: the training graph): `adapter_ids` (names,
    BASE, or ints with -1 for the base model; one per batch row) or, when None, the active
    adapter for every row."""
    if lm._adapters is None:
        if adapter_ids is not None:
            raise ValueError("adapter_ids= needs named adapters: load one with load_adapter(dir, name=...)")
        return
    listed = names(lm)
    if adapter_ids is None:
        ids = [listed.index(lm._active)] * batch
    elif isinstance(adapter_ids, torch.Tensor):
        if adapter_ids.dim() != 1 or adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
            raise ValueError(f"adapter_ids must be a 1-D integer tensor, got {adapter_ids.dtype} {tuple(adapter_ids.shape)}")
        ids = adapter_ids.tolist()
    elif isinstance(adapter_ids, (list, tuple)):
        ids = [_row_id(v, listed) for v in adapter_ids]
    else:
        got = type(adapter_ids).__name__
        raise TypeError(f"adapter_ids must be a list of adapter names/indices or an integer tensor, got {got}")
    if len(ids) != batch:
        raise ValueError(f"adapter_ids has {len(ids)} entries but the batch has {batch} rows")
    bad = [i for i in ids if not -1 <= i < len(listed)]
    if bad:
        raise ValueError(f"adapter id {bad[0]} is out of range: {len(listed)} adapters are loaded {listed}, -1 is the base model")
    gm = lm.graph_module if gm is None else gm
    device = gm._buffers[IDS].device
    setattr(gm, IDS, torch.tensor(ids, dtype=torch.long, device=device))


def _row_id(value, listed) -> int:
    if value is None or value == BASE:
        return -1
    if isinstance(value, str):
        if value not in listed:
            raise KeyError(f"adapter_ids names {value!r}, which is not loaded; loaded: {listed}")
        return listed.index(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"adapter_ids entries must be adapter names or ints, got {value!r}")
