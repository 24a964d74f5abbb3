"""(IA)³ (Liu et al. 2022, PEFT's IA3Config): a learned vector l rescales a linear layer.

A target layer computes y = (W·x + b) ⊙ l, or, when it is also a `feedforward` module,
y = W·(x ⊙ l) + b. l starts at ones, so the model starts unchanged. PEFT stores l as
`<path>.ia3_l` with shape (out, 1) for output scaling and (1, in) for input scaling; the
adapter folder is PEFT's IA3 format (adapter_config.json with peft_type "IA3").
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from lorafx.core.spec import ALL_LINEAR, TargetSelection, _matches, check_selector
from lorafx.formats.adapters import (
    KEY_PREFIX,
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


def _fail(field: str, value, allowed: str):
    raise ValueError(f"IA3Spec.{field}={value!r} is invalid: allowed is {allowed}")


@dataclasses.dataclass(frozen=True)
class IA3Spec(TargetSelection):
    """(IA)³ hyper-parameters, as PEFT's IA3Config.

    targets: the layers that get a vector (`target_modules`): "all-linear" (every linear layer
        except the output head), a list of module-name suffixes, or a regex (`re.fullmatch`).
    feedforward: the targets whose vector scales the layer's input instead of its output
        (`feedforward_modules`; the paper's feed-forward second layer, e.g. ["down_proj"]):
        a list of module-name suffixes (may be empty) or a regex. Every layer it names must be a
        target (checked on the model's layers; PEFT checks list ⊆ list literally, which rejects
        its own all-linear saves). Suffixes match at a "." boundary, as `targets` do (PEFT's
        feedforward list uses a plain `endswith`; saved configs are written so both agree).
    exclude: same forms as `targets` (`exclude_modules`); None: the output head under
        "all-linear", nothing otherwise.
    init: True starts every vector at ones (`init_ia3_weights`); False draws N(0, 1), as PEFT
        does (for tests: the model no longer starts unchanged).
    """

    targets: str | Sequence[str]
    feedforward: str | Sequence[str]
    exclude: str | Sequence[str] | None = None
    init: bool = True

    def __post_init__(self):
        object.__setattr__(self, "targets", check_selector("targets", self.targets, "IA3Spec"))
        if self.feedforward == ALL_LINEAR:
            _fail("feedforward", self.feedforward, "a list of module-name suffixes or a regex (PEFT reads "
                  "'all-linear' there as a regex that matches no module)")
        object.__setattr__(self, "feedforward", check_selector("feedforward", self.feedforward, "IA3Spec"))
        if self.exclude is not None:
            object.__setattr__(self, "exclude", check_selector("exclude", self.exclude, "IA3Spec"))
        if isinstance(self.targets, tuple) and isinstance(self.feedforward, tuple):
            # A module both names match ends with both, so one must be a "."-suffix of the other;
            # transform checks the exact subset on the model's layers.
            related = lambda f, t: f == t or f.endswith("." + t) or t.endswith("." + f)  # noqa: E731
            stray = [f for f in self.feedforward if not any(related(f, t) for t in self.targets)]
            if stray:
                allowed = f"a subset of targets={self.targets!r} ({stray[0]!r} can match no target)"
                _fail("feedforward", self.feedforward, allowed)
        if not isinstance(self.init, bool):
            _fail("init", self.init, "True (vectors start at ones) or False (N(0, 1))")

    def scales_input(self, path: str) -> bool:
        """True when the vector of target `path` scales its input (a feedforward module)."""
        return _matches(self.feedforward, path)

    def targets_layer(self, path: str) -> bool:
        """True when `targets` alone (before `exclude`) names `path`: feedforward layers must be targets."""
        return _matches(self.targets, path)

    @classmethod
    def from_peft_config(cls, config) -> "IA3Spec":
        """A spec equal to a PEFT IA3Config (a dict, an adapter_config.json or its folder)."""
        config = check_config(config, "config") if isinstance(config, dict) else read_config(config, check_config)
        selector = lambda value: value if isinstance(value, str) else sorted(value)  # noqa: E731
        return cls(
            targets=selector(config["target_modules"]),
            feedforward=selector(config["feedforward_modules"]),
            exclude=config.get("exclude_modules") or [],
            init=config.get("init_ia3_weights", True),
        )


# -- PEFT's IA3 adapter format ---------------------------------------------------------------------
def check_config(config, path: str) -> dict:
    """The fields lorafx reads from a PEFT IA3Config dict are present (PEFT fills the module
    lists from its per-model defaults on save)."""
    return check_typed_config(config, path, "IA3", "an (IA)³ model", ("target_modules", "feedforward_modules"))


def peft_config(lm) -> dict:
    """The adapter_config.json dict PEFT writes for an equivalent IA3Config (minus peft_version)."""
    sites = lm.linear_sites()
    paths = ia3_paths(lm)
    feedforward = [p for p in paths if lm.spec.scales_input(p)]
    targets = _target_modules(paths, list(sites))
    # PEFT checks feedforward ⊆ targets and picks a feedforward target by `key.endswith(name)`:
    # short names when they pick exactly ours, else full paths for both lists.
    short = sorted({p.rsplit(".", 1)[-1] for p in feedforward})
    if targets != sorted(paths) and {p for p in paths if any(p.endswith(s) for s in short)} == set(feedforward):
        feedforward = short
    else:
        targets, feedforward = sorted(paths), sorted(feedforward)
    return {
        "task_type": _task_type(lm),
        "peft_type": "IA3",
        "auto_mapping": None,
        "base_model_name_or_path": lm._base_name,
        "revision": None,
        "inference_mode": True,  # what PEFT's save_pretrained writes
        "target_modules": targets,
        "exclude_modules": None,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": any(sites[p].fan_in_fan_out for p in paths),
        "modules_to_save": None,
        "init_ia3_weights": lm.spec.init,
    }


def ia3_paths(lm) -> list[str]:
    """Module paths that carry an (IA)³ vector, in parameter order."""
    return [name[: -len(".ia3_l")] for name, _ in lm.named_lora_parameters()]


def save_adapter(lm, directory) -> None:
    write_adapter(directory, adapter_tensors(lm), peft_config(lm))


def load_adapter(lm, directory: str) -> None:
    """Check config, key set and shapes first, then copy. A vector of the other orientation
    ((1, in) vs (out, 1)) means the adapter's feedforward_modules differ from the model's."""
    _, tensors = read_adapter(directory, check_config)
    shapes = {KEY_PREFIX + name: tuple(p.shape) for name, p in lm.named_lora_parameters()}
    side = lambda shape: "input" if shape[0] == 1 else "output"  # noqa: E731  (1, in) or (out, 1)
    for key, value in tensors.items():
        ours, theirs = shapes.get(key), tuple(value.shape)
        if ours is not None and len(theirs) == 2 and 1 in theirs and side(theirs) != side(ours):
            raise AdapterError(
                f"{key} has shape {theirs}, the model expects {ours}: the adapter scales the layer's {side(theirs)}, "
                f"so its feedforward_modules differ from this model's feedforward={lm.spec.feedforward!r}; "
                f"transform with lorafx.IA3Spec.from_peft_config({directory!r})"
            )
    load_tensors(lm, tensors)
