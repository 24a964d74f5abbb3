"""What an adapter did to each layer: effective rank, relative size, intruder dimensions.

Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence"): singular vectors among the top-k of the fine-tuned weight W0 + ΔW whose
cosine similarity with *every* singular vector of W0 stays below ε — new directions that
full fine-tuning does not create and that correlate with forgetting.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib

import torch

from lorafx.formats.adapters import KEY_PREFIX, AdapterError, check_per_layer_config, layer_scale, read_adapter
from lorafx.formats.checkpoints import checkpoint_index, open_shard  # the reader from_pretrained uses
from lorafx.formats.files import write_atomically


@dataclasses.dataclass
class LayerReport:
    path: str
    shape: tuple[int, int]
    rank: int  # numerical rank of ΔW = scale·B·A
    r: int  # the layer's LoRA rank (rows of lora_A): the most `rank` can be
    effective_rank: float  # exp(entropy of normalized singular values), Roy & Vetterli 2007
    relative_norm: float  # ‖ΔW‖_F / ‖W0‖_F
    intruders: int  # intruder dimensions among the top-k singular vectors of W0 + ΔW


def diagnose(adapter_dir, base, k: int = 10, epsilon: float = 0.5) -> list[LayerReport]:
    """Report per LoRA layer of the adapter folder `adapter_dir` against `base`: a HF checkpoint
    folder (only the adapted weights are read), an nn.Module, or a dict module path → W0."""
    if not (isinstance(k, int) and k >= 1) or not 0 < epsilon < 1:
        raise ValueError(f"need k >= 1 and 0 < epsilon < 1, got k={k!r}, epsilon={epsilon!r}")
    config, tensors = read_adapter(adapter_dir, check_per_layer_config)
    paths = [t[len(KEY_PREFIX) : -len(".lora_A.weight")] for t in tensors if t.endswith(".lora_A.weight")]
    base_weights = _base_weights(base, paths)
    where = os.fspath(base) if isinstance(base, (str, os.PathLike)) else "the base"
    reports = []
    for path in sorted(paths):
        if path not in base_weights:
            raise AdapterError(f"{where} has no weight {path}.weight for adapter layer {path!r}: "
                               "is it the model the adapter was trained on?")
        a = tensors[f"{KEY_PREFIX}{path}.lora_A.weight"].float()
        b = tensors.get(f"{KEY_PREFIX}{path}.lora_B.weight")
        if b is None or b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            found = "is missing" if b is None else f"has shape {tuple(b.shape)} for lora_A {tuple(a.shape)}"
            raise AdapterError(f"{os.fspath(adapter_dir)}: lora_B of {path!r} {found}")
        w0 = base_weights[path].float()
        r = a.shape[0]  # PEFT's rank_pattern gives layers their own r
        scale = layer_scale(config, path, r)
        if not torch.isfinite(w0).all():
            raise AdapterError(f"{where}: the base weight {path}.weight holds NaN/Inf: diagnose needs finite weights")
        delta = _in_layout_of(w0, scale * (b.float() @ a), bool(config.get("fan_in_fan_out")))
        if delta is None:
            raise AdapterError(f"{path}: adapter update {(b.shape[0], a.shape[1])} does not fit {where}'s "
                               f"weight {tuple(w0.shape)}: is it the model the adapter was trained on?")
        reports.append(_layer(path, w0, delta, r, k, epsilon))
    return reports


def _in_layout_of(w0, delta, fan_in_fan_out):
    """ΔW (out, in) in the layout W0 is stored in, or None if it fits neither way. GPT-2's Conv1D
    stores W as (in, out), which PEFT marks with fan_in_fan_out; only square weights need the flag."""
    if delta.shape == w0.shape and not (fan_in_fan_out and delta.T.shape == w0.shape):
        return delta
    if delta.T.shape == w0.shape:
        return delta.T
    return None


def _layer(path, w0, delta, r, k, epsilon) -> LayerReport:
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
        r=r,
        effective_rank=float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0,
        relative_norm=float(delta.norm() / w0.norm()),
        intruders=int((best < epsilon).sum()),
    )


def _base_weights(base, paths) -> dict[str, torch.Tensor]:
    if isinstance(base, dict):
        return base
    if isinstance(base, torch.nn.Module):
        return {n[: -len(".weight")]: p.detach() for n, p in base.named_parameters() if n.endswith(".weight")}
    index = checkpoint_index(os.fspath(base))
    weights = {}
    for path in paths:
        # GPT-2-style checkpoints saved from the base model omit its prefix ("transformer.")
        for key in (f"{path}.weight", f"{path.partition('.')[2]}.weight"):
            if f"{key}.quant_state.bitsandbytes__nf4" in index:
                raise AdapterError(f"{os.fspath(base)} stores {key} in 4 bits: diagnose against the "
                                   "full-precision base model")
            if key in index:
                with open_shard(index[key]) as f:
                    weights[path] = f.get_tensor(key)
                break
    return weights


def format_table(reports: list[LayerReport]) -> str:
    lines = ["| layer | shape | rank | effective rank | ‖ΔW‖/‖W0‖ | intruder dims |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.path} | {r.shape[0]}x{r.shape[1]} | {r.rank} | {r.effective_rank:.2f} | {r.relative_norm:.4f} | {r.intruders} |"
        for r in reports
    ]
    return "\n".join(lines)


# -- heatmap: rows = layers (table order), columns = HEATMAP_COLUMNS ------------------------
HEATMAP_COLUMNS = ("rank/r", "effective rank/r", "‖ΔW‖/‖W0‖ ÷ the largest", "intruders/k")
# viridis at 0, ¼, ½, ¾, 1: dark purple → yellow, readable in grey and by colour-blind eyes;
# green rises with the value.
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def heatmap_values(reports: list[LayerReport], k: int) -> list[list[float]]:
    """Each report's metrics in [0, 1]: the fractions as they are, the relative norm over its largest."""
    largest = max((r.relative_norm for r in reports), default=0.0)
    rows = []
    for r in reports:
        row = [r.rank / r.r, r.effective_rank / r.r, r.relative_norm / largest if largest > 0 else 0.0, r.intruders / k]
        rows.append([min(max(v, 0.0), 1.0) for v in row])
    return rows


def heat_colour(value: float) -> tuple[int, int, int]:
    """value in [0, 1] → RGB, linear between the VIRIDIS stops."""
    x = min(max(value, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    t = x - i
    return tuple(round(lo + t * (hi - lo)) for lo, hi in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def encode_png(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """An 8-bit RGB PNG of rows of pixels (no filtering; zlib does the compressing)."""
    height, width = len(pixels), len(pixels[0]) if pixels else 0
    if not (height and width):
        raise ValueError("a PNG needs at least one pixel")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + bytes(c for pixel in row for c in pixel) for row in pixels)  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no filter, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_heatmap(reports: list[LayerReport], path, k: int, block: int = 16) -> None:
    """A PNG heatmap, one block×block cell per (layer, metric): rows are the reports in order,
    columns HEATMAP_COLUMNS. No text in the image: the table is its legend."""
    if not reports:
        raise ValueError("no layers to draw")
    pixels = []
    for values in heatmap_values(reports, k):
        row = [colour for v in values for colour in [heat_colour(v)] * block]
        pixels += [row] * block
    data = encode_png(pixels)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomically({os.fspath(path): write})
