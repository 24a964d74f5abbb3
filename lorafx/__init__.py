"""lorafx: compiler-style LoRA and QLoRA fine-tuning for PyTorch."""

from .adapters import AdapterError
from .api import LoraModel, count_parameters, print_trainable_parameters, transform
from .capture import CaptureError
from .checkpoint import load_checkpoint, save_checkpoint
from .combine import combine_adapters
from .diagnose import diagnose, format_table
from .export import ExportError, export
from .ia3 import IA3Spec
from .loading import CheckpointError, from_pretrained
from .loraplus import loraplus_param_groups
from .nf4 import NF4Weight, quantize_nf4
from .optim import make_optimizer
from .passes import NoTargetError
from .spec import LoraSpec
from .vera import VeraSpec

__all__ = [
    "AdapterError",
    "CaptureError",
    "CheckpointError",
    "combine_adapters",
    "count_parameters",
    "diagnose",
    "export",
    "ExportError",
    "format_table",
    "from_pretrained",
    "IA3Spec",
    "load_checkpoint",
    "LoraModel",
    "loraplus_param_groups",
    "LoraSpec",
    "make_optimizer",
    "NF4Weight",
    "NoTargetError",
    "print_trainable_parameters",
    "quantize_nf4",
    "save_checkpoint",
    "transform",
    "VeraSpec",
]
