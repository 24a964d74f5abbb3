"""Graph passes. Each is `pass(gm, spec) -> PassResult`; TRANSFORM_PASSES is the whole story
of `lorafx.transform`, read top to bottom."""

from .common import PassResult
from .dropout_follows_mode import dropout_follows_mode
from .fuse_nf4_lora import fuse_nf4_lora, unfuse_nf4_lora
from .insert_lora import NoTargetError, insert_lora
from .match_linears import match_linears
from .merge_lora import merge_lora
from .quantize_nf4 import quantize_nf4

TRANSFORM_PASSES = [
    dropout_follows_mode,  # baked dropouts → modules that obey .train()/.eval()
    match_linears,  # tag linear / Conv1D nodes with their module path
    quantize_nf4,  # QLoRA: frozen weights → NF4 storage + lorafx::nf4_dequant
    insert_lora,  # add the LoRA branch to the layers the spec selects
]

# Fusion: one lorafx op per layer. transform runs it when the model is on CUDA; the compile
# backend runs it on Dynamo's graph. merge() undoes it first (unfuse_nf4_lora).
FUSE_PASSES = [
    fuse_nf4_lora,  # (nf4_dequant →) linear + LoRA branch → lorafx::nf4_lora_linear / lorafx::lora_linear
]


def run_passes(gm, spec, passes=TRANSFORM_PASSES) -> list[PassResult]:
    return [p(gm, spec) for p in passes]


__all__ = [
    "FUSE_PASSES",
    "TRANSFORM_PASSES",
    "NoTargetError",
    "PassResult",
    "dropout_follows_mode",
    "fuse_nf4_lora",
    "insert_lora",
    "match_linears",
    "merge_lora",
    "quantize_nf4",
    "run_passes",
    "unfuse_nf4_lora",
]
