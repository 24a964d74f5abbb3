"""What an adapter did to each layer: effective rank, relative size, intruder dimensions.

Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence"): singular vectors among the top-k of the fine-tuned weight W0 + ΔW whose
cosine similarity with *every* singular vector of W0 stays below ε — new directions that
full fine-tuning does not create and that correlate with forgetting.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from .adapters import KEY_PREFIX, read_config, read_tensors


@dataclasses.dataclass
class LayerReport:
    path: str
    shape: tuple[int, int]
    rank: int  # numerical rank of ΔW = scale·B·A
    effective_rank: float  # exp(entropy of normalized singular values), Roy & Vetterli 2007
    relative_norm: float  # ‖ΔW‖_F / ‖W0‖_F
    intruders: int  # intruder dimensions among the top-k singular vectors of W0 + ΔW


def diagnose(adapter_dir, base, k: int = 10, epsilon: float = 0.5) -> list[LayerReport]:
    """Report per LoRA layer of the adapter folder `adapter_dir` against `base`: a HF checkpoint
    folder (only the adapted weights are read), an nn.Module, or a dict module path → W0."""
    if not (isinstance(k, int) and k >= 1) or not 0 < epsilon < 1:
        raise ValueError(f"need k >= 1 and 0 < epsilon < 1, got k={k!r}, epsilon={epsilon!r}")
    config = read_config(os.fspath(adapter_dir))
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    tensors = read_tensors(os.fspath(adapter_dir))
    paths = [t[len(KEY_PREFIX) : -len(".lora_A.weight")] for t in tensors if t.endswith(".lora_A.weight")]
    base_weights = _base_weights(base, paths)
    reports = []
    for key in sorted(t for t in tensors if t.endswith(".lora_A.weight")):
        path = key[len(KEY_PREFIX) : -len(".lora_A.weight")]
        if path not in base_weights:
            raise KeyError(f"the base has no weight for adapter layer {path!r}")
        w0 = base_weights[path].float()
        delta = scale * (tensors[key.replace("lora_A", "lora_B")].float() @ tensors[key].float())
        if delta.shape != w0.shape:
            delta = delta.T  # Conv1D bases store W as (in, out)
        if delta.shape != w0.shape:
            raise ValueError(f"{path}: adapter update {tuple(delta.shape)} does not fit base weight {tuple(w0.shape)}")
        reports.append(_layer(path, w0, delta, k, epsilon))
    return reports


def _layer(path, w0, delta, k, epsilon) -> LayerReport:
    s = torch.linalg.svdvals(delta)
    tol = s.max() * max(delta.shape) * torch.finfo(s.dtype).eps if s.numel() else 0
    p = s / s.sum() if s.sum() > 0 else s
    p = p[p > 0]
    u0 = torch.linalg.svd(w0, full_matrices=False).U
    u1 = torch.linalg.svd(w0 + delta, full_matrices=False).U[:, :k]
    best = (u1.T @ u0).abs().max(dim=1).values  # each top-k vector's closest pre-trained one
    return LayerReport(
        path=path,
        shape=tuple(w0.shape),
        rank=int((s > tol).sum()),
        effective_rank=float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0,
        relative_norm=float(delta.norm() / w0.norm()),
        intruders=int((best < epsilon).sum()),
    )


def _base_weights(base, paths) -> dict[str, torch.Tensor]:
    if isinstance(base, dict):
        return base
    if isinstance(base, torch.nn.Module):
        return {n[: -len(".weight")]: p.detach() for n, p in base.named_parameters() if n.endswith(".weight")}
    from .loading import checkpoint_index, open_shard  # the reader from_pretrained uses

    index = checkpoint_index(os.fspath(base))
    weights = {}
    for path in paths:
        key = f"{path}.weight"
        if key in index:
            with open_shard(index[key]) as f:
                weights[path] = f.get_tensor(key)
    return weights


def format_table(reports: list[LayerReport]) -> str:
    lines = ["| layer | shape | rank | effective rank | ‖ΔW‖/‖W0‖ | intruder dims |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.path} | {r.shape[0]}x{r.shape[1]} | {r.rank} | {r.effective_rank:.2f} | {r.relative_norm:.4f} | {r.intruders} |"
        for r in reports
    ]
    return "\n".join(lines)
