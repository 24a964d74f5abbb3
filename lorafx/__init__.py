"""lorafx: compiler-style LoRA and QLoRA fine-tuning for PyTorch."""

from .core.capture import CaptureError
from .core.model import LoraModel, count_parameters, print_trainable_parameters, transform
from .core.pretrained import from_pretrained
from .core.spec import LoraSpec
from .formats.adapters import AdapterError
from .formats.checkpoints import CheckpointError
from .formats.nf4 import NF4Weight, quantize_nf4
from .generation.export import ExportError, export
from .integrations.trainer import adapter_trainer
from .passes import NoTargetError
from .runtime.checkpoint import load_checkpoint, save_checkpoint
from .runtime.loraplus import loraplus_param_groups
from .runtime.optim import make_optimizer
from .tools.combine import combine_adapters
from .tools.diagnose import diagnose, format_table
from .variants.ia3 import IA3Spec
from .variants.vera import VeraSpec

__all__ = [
    "adapter_trainer",
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
