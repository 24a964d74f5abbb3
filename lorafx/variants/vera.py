"""VeRA (Kopiczko et al. 2024, PEFT's VeraConfig): one pair of frozen random matrices shared by
every target layer, and two trainable vectors per layer.

A target layer computes y = W·x + b + λ_b ⊙ (B_s · (λ_d ⊙ (A_s · dropout(x)))), where A (r, max in)
and B (max out, r) are kaiming-uniform from a seeded generator (`projection_prng_key`) and A_s, B_s
are their slices to the layer's in / out features. λ_d (r,) starts at d_initial and λ_b (out,) at
zero, so the model starts unchanged. The adapter folder is PEFT's VERA format: `<path>.vera_lambda_b`
/ `.vera_lambda_d`, plus `base_model.vera_A` / `base_model.vera_B` with save_projection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from lorafx.core.spec import ALL_LINEAR, TargetSelection, check_selector
from lorafx.formats.adapters import (
    AdapterError,
    _target_modules,
    _task_type,
    adapter_tensors,
    check_typed_config,
    load_tensors,
    read_adapter,
    read_config,
    write_adapter,
)

PROJECTION_PREFIX = "base_model."  # PEFT's keys for the shared matrices: base_model.vera_A / vera_B
PROJECTIONS = ("vera_A", "vera_B")  # graph-module buffers (persistent: state_dict round-trips them)


def _fail(field: str, value, allowed: str):
    raise ValueError(f"VeraSpec.{field}={value!r} is invalid: allowed is {allowed}")


@dataclasses.dataclass(frozen=True)
class VeraSpec(TargetSelection):
    """VeRA hyper-parameters, as PEFT's VeraConfig (its names in parentheses).

    r: rank of the shared projections (`r`, PEFT's default 256). targets / exclude: as LoraSpec's
    (`target_modules` / `exclude_modules`). dropout: on the VeRA input (`vera_dropout`).
    d_initial: λ_d's start value (`d_initial`). projection_prng_key: seed of the generator A and B
    are drawn from (`projection_prng_key`); save_projection: write A and B into the adapter
    (`save_projection`; without them a loader regenerates them from the seed). init: True is
    PEFT's init (λ_b = 0, λ_d = d_initial); False gives λ_b = 1, λ_d ~ N(0, 1) (`init_weights`).
    """

    r: int = 256
    targets: str | Sequence[str] = ALL_LINEAR
    exclude: str | Sequence[str] | None = None
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True
    init: bool = True

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            _fail("r", self.r, "an integer >= 1")
        object.__setattr__(self, "targets", check_selector("targets", self.targets, "VeraSpec"))
        if self.exclude is not None:
            object.__setattr__(self, "exclude", check_selector("exclude", self.exclude, "VeraSpec"))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            _fail("dropout", self.dropout, "a number with 0 <= dropout < 1")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) or not math.isfinite(
            self.d_initial
        ):
            _fail("d_initial", self.d_initial, "a finite number")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            _fail("projection_prng_key", self.projection_prng_key, "an integer (a torch.Generator seed)")
        for field in ("save_projection", "init"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, getattr(self, field), "True or False")

    @classmethod
    def from_peft_config(cls, config) -> "VeraSpec":
        """A spec equal to a PEFT VeraConfig (a dict, an adapter_config.json or its folder)."""
        config = check_config(config, "config") if isinstance(config, dict) else read_config(config, check_config)
        targets = config["target_modules"]
        return cls(
            r=config["r"],
            targets=targets if isinstance(targets, str) else sorted(targets),
            exclude=config.get("exclude_modules") or [],
            dropout=config.get("vera_dropout", 0.0),
            d_initial=config.get("d_initial", 0.1),
            projection_prng_key=config.get("projection_prng_key", 0),
            save_projection=config.get("save_projection", True),
            init=config.get("init_weights", True),
        )


# -- PEFT's VERA adapter format --------------------------------------------------------------------
def check_config(config, path: str) -> dict:
    """The fields lorafx reads from a PEFT VeraConfig dict are present and supported."""
    check_typed_config(config, path, "VERA", "a VeRA model", ("r", "target_modules"))
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r}; lorafx supports VeRA with bias='none' only")
    if config.get("layers_to_transform") is not None:
        raise AdapterError(f"{path}: layers_to_transform is not supported; select layers with target_modules")
    return config


def vera_paths(lm) -> list[str]:
    """Module paths that carry VeRA, in parameter order."""
    return [name[: -len(".vera_lambda_b")] for name, _ in lm.named_lora_parameters() if name.endswith(".vera_lambda_b")]


def peft_config(lm) -> dict:
    """The adapter_config.json dict PEFT writes for an equivalent VeraConfig (minus peft_version)."""
    spec, sites, paths = lm.spec, lm.linear_sites(), vera_paths(lm)
    return {
        "task_type": _task_type(lm),
        "peft_type": "VERA",
        "auto_mapping": None,
        "base_model_name_or_path": lm._base_name,
        "revision": None,
        "inference_mode": True,  # what PEFT's save_pretrained writes
        "r": spec.r,
        "target_modules": _target_modules(paths, list(sites)),
        "projection_prng_key": spec.projection_prng_key,
        "save_projection": spec.save_projection,
        "vera_dropout": spec.dropout,
        "d_initial": spec.d_initial,
        "fan_in_fan_out": any(sites[p].fan_in_fan_out for p in paths),
        "bias": "none",
        "modules_to_save": None,
        "init_weights": spec.init,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def save_adapter(lm, directory) -> None:
    tensors = adapter_tensors(lm)
    if lm.spec.save_projection:
        for name in PROJECTIONS:
            tensors[PROJECTION_PREFIX + name] = lm.graph_module.get_buffer(name).detach().to("cpu").contiguous()
    write_adapter(directory, tensors, peft_config(lm))


def load_adapter(lm, directory: str) -> None:
    """Check config, projections, key set and shapes first, then copy. Saved projections are
    loaded (as PEFT does); without them the adapter must use the model's r and seed."""
    config, tensors = read_adapter(directory, check_config)
    spec = lm.spec
    if config["r"] != spec.r:
        raise AdapterError(f"adapter r={config['r']} but the model was transformed with r={spec.r}")
    projections = {name: tensors.pop(PROJECTION_PREFIX + name, None) for name in PROJECTIONS}
    if any(p is None for p in projections.values()):
        if any(p is not None for p in projections.values()):
            raise AdapterError(f"{directory} holds only one of base_model.vera_A / base_model.vera_B")
        if config.get("projection_prng_key", 0) != spec.projection_prng_key:
            raise AdapterError(
                f"adapter projection_prng_key={config.get('projection_prng_key', 0)} and no saved projections, but the "
                f"model's vera_A / vera_B come from projection_prng_key={spec.projection_prng_key}; transform with "
                f"lorafx.VeraSpec.from_peft_config({directory!r})"
            )
    else:
        for name, value in projections.items():
            ours = lm.graph_module.get_buffer(name)
            if tuple(value.shape) != tuple(ours.shape):
                raise AdapterError(
                    f"{PROJECTION_PREFIX + name} has shape {tuple(value.shape)}, the model expects {tuple(ours.shape)} "
                    "(r by the largest in / out features of the targets)"
                )
    load_tensors(lm, tensors)
    with torch.no_grad():
        for name, value in projections.items():
            if value is not None:
                lm.graph_module.get_buffer(name).copy_(value)
