"""Adapter types other than LoRA, in ONE table: what each spec class runs and where its files
are handled.

The table serves transform / merge() / disable_adapters() (the passes) and save/load (the
module with the PEFT file format), so adding a type is one row here and one module beside
this file; the core reads the table and a variant never imports the core's model back.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable, NamedTuple

from lorafx.core.spec import LoraSpec
from lorafx.formats import adapters
from lorafx.passes import (
    IA3_TRANSFORM_PASSES,
    VERA_TRANSFORM_PASSES,
    merge_ia3,
    merge_vera,
    strip_ia3,
    strip_vera,
)

from . import ia3
from . import vera


class Variant(NamedTuple):
    passes: list  # what transform runs
    merge: Callable  # what merge() runs on its copy
    strip: Callable  # removes the adapter, folding nothing: disable_adapters()'s base graph
    files: ModuleType  # save_adapter / load_adapter in PEFT's format for this type
    peft_type: str  # adapter_config.json's peft_type


VARIANTS = {
    ia3.IA3Spec: Variant(IA3_TRANSFORM_PASSES, merge_ia3, strip_ia3, ia3, "IA3"),
    vera.VeraSpec: Variant(VERA_TRANSFORM_PASSES, merge_vera, strip_vera, vera, "VERA"),
}
SPECS = (LoraSpec, *VARIANTS)  # every spec class transform takes


def variant_of(spec) -> Variant | None:
    """The Variant of a non-LoRA spec, None for a LoraSpec."""
    return next((v for cls, v in VARIANTS.items() if isinstance(spec, cls)), None)


def files_for(spec) -> ModuleType:
    """The module with save_adapter(lm, dir) / load_adapter(lm, dir) for this spec's adapter type."""
    variant = variant_of(spec)
    return variant.files if variant else adapters


def spec_for(directory):
    """The lorafx spec (LoraSpec, IA3Spec or VeraSpec) equal to the PEFT config in `directory`."""
    raw = adapters.read_config(directory, check=lambda config, path: config)
    peft_type = raw.get("peft_type", "LORA") if isinstance(raw, dict) else "LORA"
    spec_class = next((cls for cls, v in VARIANTS.items() if v.peft_type == peft_type), LoraSpec)
    return spec_class.from_peft_config(directory)
