"""Adapter arithmetic: several PEFT-format adapters → one new adapter folder.

The methods and their maths are PEFT's `add_weighted_adapter`, so the result equals what PEFT
writes for the same inputs (tested with PEFT as the oracle; the random DARE methods equal it
for the same random masks):

- linear, ties, dare_linear, dare_ties, magnitude_prune: combine the A's and the B's
  separately, each source weighted by √|w·scale| (the sign on A), so B·A mixes like the
  weights; all adapters need the same r.
- cat: stack the A's (times w·scale) and the B's: rank = Σr, exact Σ w·scale·B·A.
- svd: Δ = Σ w·scale·B·A per layer, truncated SVD to rank `svd_rank` (default max r).
The new adapter has lora_alpha = r and use_rslora false (scale 1: every source's own scale,
rsLoRA's alpha/√r included, is in the weights; peft#3449), one rank for every layer (zero rows
pad the lower ranks of rank_pattern adapters, as PEFT pads cat), and no rank/alpha patterns.
"""

from __future__ import annotations

import json
import math
import os

import safetensors.torch
import torch

from lorafx.formats.adapters import (
    KEY_PREFIX,
    AdapterError,
    check_per_layer_config,
    layer_scale,
    pattern_value,
    read_adapter,
)
from lorafx.formats.files import write_atomically, write_text

SEPARATE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = SEPARATE + ("cat", "svd")
SIGN_METHODS = ("total", "frequency")


def combine_adapters(
    adapters: list,
    weights: list[float],
    out,
    method: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    seed: int = 0,
) -> str:
    """Write the combination of the adapter folders `adapters` to the folder `out`; return it.

    `density` (0 < d ≤ 1) is required by ties, dare_* and magnitude_prune: the fraction of
    entries each source keeps. `seed` drives DARE's random masks. "dare" means "dare_linear".
    Every input is read and checked before `out` is written: plain LoRA adapters (no DoRA, no
    modules_to_save) of one model, each layer's rank as its config says (`rank_pattern` too).
    """
    method = "dare_linear" if method == "dare" else method
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: allowed is {', '.join(METHODS)}")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"need one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights={list(weights)!r} is invalid: allowed is finite numbers")
    needs_density = method in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"method={method!r} needs density with 0 < density <= 1, got {density!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method={majority_sign_method!r} is invalid: allowed is total or frequency")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank={svd_rank!r} is invalid: allowed is None (the largest r) or an integer >= 1")
    folders = [os.fspath(a) for a in adapters]
    # each folder's config and tensors of one save; rank_pattern / alpha_pattern are applied per layer
    pairs = [read_adapter(folder, check_per_layer_config) for folder in folders]
    configs = [_combinable(config, folder) for folder, (config, _) in zip(folders, pairs)]
    layers = [_layers(tensors, config, folder) for folder, config, (_, tensors) in zip(folders, configs, pairs)]
    # As PEFT: an adapter's rank is its largest (r or a rank_pattern value); zero rows pad the rest.
    ranks = [max([c["r"], *(c.get("rank_pattern") or {}).values()]) for c in configs]
    if method in SEPARATE and len(set(ranks)) > 1 and len(adapters) > 1:
        raise ValueError(f"method={method!r} needs adapters of equal r, got r={ranks}; use 'cat' or 'svd'")
    if len(adapters) == 1:
        method = "linear"  # as PEFT: one adapter can only be rescaled
    new_rank = {"cat": sum(ranks), "svd": svd_rank or max(ranks)}.get(method, ranks[0])
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for path in sorted(set().union(*layers)):
        sources = [(*found[path][:2], w * found[path][2]) for found, w in zip(layers, weights) if path in found]
        _check_layer(path, sources, method, new_rank, [f for f, found in zip(folders, layers) if path in found])
        a, b = _combine(sources, method, density, majority_sign_method, new_rank, generator)
        pad = new_rank - a.shape[0]
        result[f"{KEY_PREFIX}{path}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        result[f"{KEY_PREFIX}{path}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    config = dict(configs[0])
    targets = [c["target_modules"] for c in configs]
    config.update(
        r=new_rank,
        lora_alpha=new_rank,  # scale 1: every source's scale is in the weights
        use_rslora=False,  # else the scale is √r (the fix of peft#3449)
        rank_pattern={},
        alpha_pattern={},
        target_modules="|".join(f"({t})" for t in targets)
        if all(isinstance(t, str) for t in targets)
        else sorted(set().union(*[[t] if isinstance(t, str) else t for t in targets])),
    )
    if any(c.get("layers_to_transform") not in (None, []) for c in configs):
        # The sources' layer filters need not agree: name the combined layers in full, which
        # PEFT matches exactly, past any layers_to_transform.
        paths = sorted({k[len(KEY_PREFIX) :].rsplit(".lora_", 1)[0] for k in result})
        config.update(target_modules=paths, layers_to_transform=None, layers_pattern=None)
    out = os.fspath(out)
    write_atomically(
        {
            os.path.join(out, "adapter_model.safetensors"): lambda tmp: safetensors.torch.save_file(
                result, tmp, metadata={"format": "pt"}
            ),
            os.path.join(out, "adapter_config.json"): write_text(json.dumps(config, indent=2, sort_keys=True)),
        }
    )
    return out


def _combinable(config: dict, folder: str) -> dict:
    """Refuse what a weighted sum of B·A cannot carry: DoRA magnitudes, modules trained in full."""
    if config.get("use_dora"):
        raise AdapterError(
            f"{folder} is a DoRA adapter (use_dora=true): its magnitude vectors rescale each row of W + ΔW, which no "
            "combination of B·A reproduces (PEFT's add_weighted_adapter does not combine them either); "
            "merge each DoRA adapter into the model instead"
        )
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{folder} trains modules_to_save={config['modules_to_save']!r} in full (e.g. a classifier head): "
            "combine_adapters combines LoRA layers only, and full weights of two adapters cannot be weighted "
            "together; combine adapters without modules_to_save"
        )
    return config


def _layers(tensors: dict, config: dict, folder: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module path → (A, B, scale) from an adapter's keys, each layer's rank checked against its config."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path, _, kind = key.removeprefix(KEY_PREFIX).rpartition(".lora_")
        if not key.startswith(KEY_PREFIX) or kind not in ("A.weight", "B.weight") or value.dim() != 2:
            raise AdapterError(
                f"{folder}: {key} {tuple(value.shape)} is not a 2-d lora_A/lora_B weight under {KEY_PREFIX!r}; "
                "combine_adapters combines LoRA layers of linear modules only"
            )
        pairs.setdefault(path, {})[kind[0]] = value
    layers = {}
    for path, ab in pairs.items():
        if ab.keys() != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise AdapterError(f"{folder}: {KEY_PREFIX}{path}.lora_{missing}.weight is missing")
        r = pattern_value(config.get("rank_pattern"), path, config["r"])
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise AdapterError(
                f"{folder}: {path} has lora_A {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)}, but "
                f"adapter_config.json gives it r={r} (r, rank_pattern): the files disagree"
            )
        layers[path] = (ab["A"], ab["B"], layer_scale(config, path, r))
    return layers


def _check_layer(path, sources, method, new_rank, folders) -> None:
    """The sources of one layer fit together: one model's shapes, equal ranks where A's and B's mix."""
    shapes = [(b.shape[0], a.shape[1]) for a, b, _ in sources]
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{f}: {s[0]}x{s[1]}" for f, s in zip(folders, shapes))
        raise AdapterError(f"{path} has different shapes (out x in) in the adapters ({listed}): adapters of different models")
    if method in SEPARATE and len({a.shape[0] for a, _, _ in sources}) > 1:
        listed = ", ".join(f"{f}: r={a.shape[0]}" for f, (a, _, _) in zip(folders, sources))
        raise AdapterError(f"method={method!r} mixes A's and B's, but {path} has different ranks ({listed}); use 'cat' or 'svd'")
    if method == "svd" and new_rank > min(shapes[0]):
        raise ValueError(
            f"svd_rank={new_rank} (default: the largest r) is invalid for {path} ({shapes[0][0]}x{shapes[0][1]}): "
            f"allowed is at most min(out, in) = {min(shapes[0])}"
        )


def _combine(sources, method, density, sign_method, new_rank, generator):
    dtype = sources[0][0].dtype
    if method == "cat":
        return torch.cat([a * w for a, _, w in sources]), torch.cat([b for _, b, _ in sources], dim=1)
    if method == "svd":
        delta = sum(w * (b @ a) for a, b, w in sources)
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        return vh[:new_rank], u[:, :new_rank] @ torch.diag(s[:new_rank])
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for _, _, w in sources])
    weights_b = torch.tensor([math.sqrt(abs(w)) for _, _, w in sources])
    mixed = [
        _task_arithmetic([src[i] for src in sources], weights, method, density, sign_method, generator)
        for i, weights in ((0, weights_a), (1, weights_b))
    ]
    return mixed[0].to(dtype), mixed[1].to(dtype)


def _task_arithmetic(tensors, weights, method, density, sign_method, generator):
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method.startswith("dare"):
        tensors = [_drop_and_rescale(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    # TIES: keep, per entry, only the sources that agree with the majority sign, averaged.
    magnitude = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    agree = stacked.sign() == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _keep_largest(tensor, density):
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def _drop_and_rescale(tensor, density, generator):
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density
