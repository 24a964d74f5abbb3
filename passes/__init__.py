"""Graph passes. Each is `pass(gm, spec) -> PassResult`; TRANSFORM_PASSES is the whole story
of `lorafx.transform`, read top to bottom."""

from .common import PassResult
from .dropout_follows_mode import dropout_follows_mode
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


def run_passes(gm, spec, passes=TRANSFORM_PASSES) -> list[PassResult]:
    return [p(gm, spec) for p in passes]


__all__ = [
    "TRANSFORM_PASSES",
    "NoTargetError",
    "PassResult",
    "dropout_follows_mode",
    "insert_lora",
    "match_linears",
    "merge_lora",
    "quantize_nf4",
    "run_passes",
]
