"""PiSSA and LoftQ initialisation: LoRA factors computed from the weights they adapt."""

from __future__ import annotations

import torch

from lorafx.formats.nf4 import quantize_nf4

from .common import LINEAR, PassResult, tied_parameters

LORA_INIT = "lorafx.lora_init"  # gm.meta key: {module path: (A, B)} for insert_lora, which pops it


def init_lora(gm: torch.fx.GraphModule, spec) -> PassResult:
    """PiSSA / LoftQ: compute each selected layer's A, B from its weight W and rewrite W.

    Runs before quantize_nf4, on the full-precision weights, in float32 on their device:
    - "pissa" (PEFT's pissa_init): W = U·S·Vh, A = √(S_r/scale)·Vh_r, B = U_r·√(S_r/scale)
      and W ← W − scale·B·A, so the layer computes W at init and training moves the
      principal directions. "pissa_niter_N" takes U_r, S_r, Vh_r from
      torch.svd_lowrank(W, q=r, niter=N) instead, as PEFT does. With quantize="nf4" the
      residual is what gets quantized (QPiSSA).
    - "loftq" (PEFT's loftq_init loop, `spec.loftq_iter` rounds): Q = NF4(W − L·R) with L·R
      the best rank-r fit of W − Q from the previous round (zero at first), quantized by our
      bitsandbytes-exact quantizer with the spec's blocksize/double_quant. W is replaced by
      the last matrix quantized, so quantize_nf4 rebuilds exactly that Q, and scale·B·A = L·R
      is the rank-r fit of W − Q. PEFT stores L, R unscaled, which is right only when
      alpha = r (huggingface/peft#1982); dividing by scale keeps it right for every alpha.
      Layers the spec does not quantize keep the default init.
    A and B (float32) wait in gm.meta[LORA_INIT] for insert_lora. kaiming/gaussian: no-op.
    """
    counts = {"pissa": 0, "loftq": 0, "default": 0}
    if not spec.init_from_weights:
        return PassResult("init_lora", counts)
    tied = tied_parameters(gm)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    done = set()
    for node in gm.graph.nodes:
        site = node.meta.get(LINEAR)
        if site is None or not spec.selects(site.path) or site.path in done:
            continue
        done.add(site.path)
        if spec.init == "loftq" and not spec.quantizes(site.path):
            counts["default"] += 1
            continue
        weight = _full_precision_weight(gm.get_submodule(site.path), site, spec, tied)
        w = weight.detach().to(torch.float32)
        w = w.T if site.fan_in_fan_out else w
        try:
            base, a, b = _loftq(w, weight.dtype, spec) if spec.init == "loftq" else _pissa(w, spec)
        except ValueError as e:  # the NF4 quantizer's, which does not know the layer
            raise ValueError(f"{site.path}.weight: {e}") from e
        with torch.no_grad():
            weight.copy_(base.T if site.fan_in_fan_out else base)
        factors[site.path] = (a, b)
        counts["loftq" if spec.init == "loftq" else "pissa"] += 1
    gm.meta[LORA_INIT] = factors
    return PassResult("init_lora", counts)



def _full_precision_weight(owner, site, spec, tied) -> torch.nn.Parameter:
    weight = getattr(owner, "weight", None)
    what = f"LoraSpec.init={spec.init!r} computes A, B from the full-precision weight of {site.path}"
    if not isinstance(weight, torch.Tensor) or weight.is_meta:
        raise ValueError(
            f"{what}, but it is {'on the meta device' if weight is not None else 'already NF4'} "
            "(a 4-bit checkpoint, or lorafx.from_pretrained with quantize='nf4', which quantizes while "
            "streaming): load the model in float with transformers and call lorafx.transform(model, spec)"
        )
    if id(weight) in tied:
        raise ValueError(
            f"{what} and rewrites it, but that weight is tied ({', '.join(tied[id(weight)])}); "
            "leave the layer out of LoraSpec.targets or untie the weights"
        )
    if spec.r > min(site.in_features, site.out_features):
        raise ValueError(
            f"{what}: LoraSpec.r={spec.r} exceeds its rank bound min(in, out) = "
            f"{min(site.in_features, site.out_features)}; use a smaller r or leave the layer out of targets"
        )
    return weight


def _pissa(w: torch.Tensor, spec):
    """PEFT's pissa_init, step for step (so full-SVD results match it bit for bit)."""
    r, scale = spec.r, spec.scale
    if spec.init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=int(spec.init.removeprefix("pissa_niter_")))
        vh = v.t()
    a, b = _split(u, s, vh, scale)
    return w - scale * b @ a, a, b


def _loftq(w: torch.Tensor, dtype: torch.dtype, spec):
    """PEFT's loftq_init loop with our NF4 quantizer; returns the weight to store (in `dtype`)."""
    target = w
    for i in range(spec.loftq_iter):
        stored = target.to(dtype)  # exactly what quantize_nf4 will quantize
        q = quantize_nf4(stored, spec.blocksize, spec.double_quant).dequantize().to(torch.float32)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        a, b = _split(u[:, : spec.r], s[: spec.r], vh[: spec.r], spec.scale)
        if i + 1 < spec.loftq_iter:
            target = w - spec.scale * b @ a
    return stored, a, b


def _split(u, s, vh, scale):
    """A, B with scale·B·A = U·diag(S)·Vh, the singular values shared evenly between them."""
    root = torch.diag(torch.sqrt(s / scale))
    return root @ vh, u @ root
