"""lorafx: compiler-style LoRA and QLoRA fine-tuning for PyTorch."""

from .adapters import AdapterError
from .api import LoraModel, count_parameters, print_trainable_parameters, transform
from .capture import CaptureError
from .passes import NoTargetError
from .spec import LoraSpec

__all__ = [
    "AdapterError",
    "CaptureError",
    "LoraModel",
    "LoraSpec",
    "NoTargetError",
    "count_parameters",
    "print_trainable_parameters",
    "transform",
]
