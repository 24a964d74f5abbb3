"""Adapter arithmetic: several PEFT-format adapters → one new adapter folder.

The methods and their maths are PEFT's `add_weighted_adapter`, so the result equals what PEFT
writes for the same inputs (tested with PEFT as the oracle; the random DARE methods equal it
for the same random masks):

- linear, ties, dare_linear, dare_ties, magnitude_prune: combine the A's and the B's
  separately, each source weighted by √|w·scale| (the sign on A), so B·A mixes like the
  weights; all adapters need the same r.
- cat: stack the A's (times w·scale) and the B's: rank = Σr, exact Σ w·scale·B·A.
- svd: Δ = Σ w·scale·B·A per layer, truncated SVD to rank `svd_rank` (default max r).
The new adapter has lora_alpha = r (scale 1), as PEFT writes it.
"""

from __future__ import annotations

import json
import math
import os

import safetensors.torch
import torch

from lorafx.formats.adapters import KEY_PREFIX, read_config, read_tensors
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
    """
    method = "dare_linear" if method == "dare" else method
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: allowed is {', '.join(METHODS)}")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"need one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights")
    needs_density = method in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"method={method!r} needs density with 0 < density <= 1, got {density!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method={majority_sign_method!r} is invalid: allowed is total or frequency")
    configs = [read_config(os.fspath(a)) for a in adapters]
    tensors = [_layers(read_tensors(os.fspath(a))) for a in adapters]
    scales = [c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"]) for c in configs]
    ranks = [c["r"] for c in configs]
    if method in SEPARATE and len(set(ranks)) > 1 and len(adapters) > 1:
        raise ValueError(f"method={method!r} needs adapters of equal r, got r={ranks}; use 'cat' or 'svd'")
    if len(adapters) == 1:
        method = "linear"  # as PEFT: one adapter can only be rescaled
    new_rank = {"cat": sum(ranks), "svd": svd_rank or max(ranks)}.get(method, ranks[0])
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for path in sorted(set().union(*tensors)):
        sources = [(t[path][0], t[path][1], w * s) for t, w, s in zip(tensors, weights, scales) if path in t]
        a, b = _combine(sources, method, density, majority_sign_method, new_rank, generator)
        result[f"{KEY_PREFIX}{path}.lora_A.weight"] = a.contiguous()
        result[f"{KEY_PREFIX}{path}.lora_B.weight"] = b.contiguous()
    config = dict(configs[0])
    targets = [c["target_modules"] for c in configs]
    config.update(
        r=new_rank,
        lora_alpha=new_rank,
        rank_pattern={},
        alpha_pattern={},
        target_modules="|".join(f"({t})" for t in targets)
        if all(isinstance(t, str) for t in targets)
        else sorted(set().union(*[[t] if isinstance(t, str) else t for t in targets])),
    )
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


def _layers(tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path → (A, B) from an adapter's keys."""
    paths = {k[len(KEY_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors}
    return {
        p: (tensors[f"{KEY_PREFIX}{p}.lora_A.weight"], tensors[f"{KEY_PREFIX}{p}.lora_B.weight"])
        for p in paths
    }


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
