"""Graph passes. Each is `pass(gm, spec) -> PassResult`; TRANSFORM_PASSES is the whole story
of `lorafx.transform`, read top to bottom."""

from .adapter_bank import inline_multi_lora
from .checkpoint_layers import checkpoint_layers, graph_nodes, inline_checkpointed_layers
from .common import PassResult
from .dropout_follows_mode import dropout_follows_mode
from .fuse_nf4_lora import fuse_nf4_lora, unfuse_nf4_lora
from .init_lora import init_lora
from .insert_ia3 import insert_ia3, merge_ia3, strip_ia3
from .insert_lora import NoTargetError, insert_lora
from .insert_vera import insert_vera, merge_vera, strip_vera
from .loss_head import find_loss_head, loss_head, split_at_loss_head
from .match_linears import match_linears
from .merge_lora import merge_lora
from .no_grad_lora import no_grad_lora
from .quantize_nf4 import quantize_nf4

# Fusion: one lorafx op per layer. transform runs it on CUDA (fuse_on_cuda); the compile
# backend runs it on Dynamo's graph. merge() undoes it first (unfuse_nf4_lora).
FUSE_PASSES = [
    fuse_nf4_lora,  # (nf4_dequant →) linear + LoRA branch → lorafx::nf4_lora_linear / lorafx::lora_linear
]


# The compile backend off CUDA, where the fused ops' reference paths are slower than Inductor's code.
CPU_COMPILE_PASSES = [
    inline_multi_lora,  # lorafx::multi_lora (adapter banks) → gathered-bank aten ops Inductor fuses
]


def run_passes(gm, spec, passes) -> list[PassResult]:
    return [p(gm, spec) for p in passes]


def fuse_on_cuda(gm, spec) -> PassResult:
    """FUSE_PASSES when the graph's parameters are on CUDA, where the fused ops are Triton
    kernels; on CPU the unfused aten graph is faster than the ops' reference path."""
    counts: dict[str, int] = {}
    if any(p.is_cuda for p in gm.parameters()):
        for result in run_passes(gm, spec, FUSE_PASSES):
            counts.update({f"{result.name}.{k}": v for k, v in result.counts.items()})
    return PassResult("fuse_on_cuda", counts)


TRANSFORM_PASSES = [
    dropout_follows_mode,  # baked dropouts → modules that obey .train()/.eval()
    match_linears,  # tag linear / Conv1D nodes with their module path
    init_lora,  # init="pissa"/"loftq": A, B from the full-precision weights, which it rewrites
    quantize_nf4,  # QLoRA: frozen weights → NF4 storage + lorafx::nf4_dequant
    insert_lora,  # add the LoRA branch to the layers the spec selects
    fuse_on_cuda,  # CUDA only: base + LoRA (+ dequant) → one fused op (before checkpointing: it reads the flat graph)
    checkpoint_layers,  # checkpoint="layer": each decoder layer recomputed in the backward
    find_loss_head,  # report the row-wise output head a training call with labels runs chunked with its loss
]

# lorafx.transform with an IA3Spec: (IA)³ instead of LoRA. merge() runs merge_ia3.
IA3_TRANSFORM_PASSES = [
    dropout_follows_mode,  # baked dropouts → modules that obey .train()/.eval()
    match_linears,  # tag linear / Conv1D nodes with their module path
    insert_ia3,  # scale the input (feedforward) or output of each selected layer by a learned vector
    find_loss_head,  # report the row-wise output head a training call with labels runs chunked with its loss
]

# lorafx.transform with a VeraSpec: VeRA instead of LoRA. merge() runs merge_vera.
VERA_TRANSFORM_PASSES = [
    dropout_follows_mode,  # baked dropouts → modules that obey .train()/.eval()
    match_linears,  # tag linear / Conv1D nodes with their module path
    insert_vera,  # shared frozen projections + per-layer λ_d, λ_b branch on each selected layer
    find_loss_head,  # report the row-wise output head a training call with labels runs chunked with its loss
]

__all__ = [
    "CPU_COMPILE_PASSES",
    "FUSE_PASSES",
    "TRANSFORM_PASSES",
    "IA3_TRANSFORM_PASSES",
    "VERA_TRANSFORM_PASSES",
    "NoTargetError",
    "PassResult",
    "checkpoint_layers",
    "dropout_follows_mode",
    "find_loss_head",
    "fuse_nf4_lora",
    "fuse_on_cuda",
    "graph_nodes",
    "init_lora",
    "inline_multi_lora",
    "inline_checkpointed_layers",
    "insert_ia3",
    "insert_lora",
    "insert_vera",
    "loss_head",
    "match_linears",
    "merge_ia3",
    "merge_lora",
    "merge_vera",
    "no_grad_lora",
    "quantize_nf4",
    "run_passes",
    "split_at_loss_head",
    "strip_ia3",
    "strip_vera",
    "unfuse_nf4_lora",
]
