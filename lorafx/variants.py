"""Adapter types other than LoRA: what each spec class runs and where its files are handled.

One table serves transform / merge() / disable_adapters() (the passes) and save/load (the
module with the PEFT file format), so adding a type is one row.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable, NamedTuple

from lorafx.passes import (
    IA3_TRANSFORM_PASSES,
    VERA_TRANSFORM_PASSES,
    merge_ia3,
    merge_vera,
    strip_ia3,
    strip_vera,
)

from . import ia3, vera


class Variant(NamedTuple):
    passes: list  # what transform runs
    merge: Callable  # what merge() runs on its copy
    strip: Callable  # removes the adapter, folding nothing: disable_adapters()'s base graph
    files: ModuleType  # save_adapter / load_adapter in PEFT's format for this type


VARIANTS = {
    ia3.IA3Spec: Variant(IA3_TRANSFORM_PASSES, merge_ia3, strip_ia3, ia3),
    vera.VeraSpec: Variant(VERA_TRANSFORM_PASSES, merge_vera, strip_vera, vera),
}


def variant_of(spec) -> Variant | None:
    """The Variant of a non-LoRA spec, None for a LoraSpec."""
    return next((v for cls, v in VARIANTS.items() if isinstance(spec, cls)), None)
