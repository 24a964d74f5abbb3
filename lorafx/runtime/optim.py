"""Optimizers by name, including the memory-saving ones QLoRA recipes use.

    opt = lorafx.make_optimizer("paged_adamw8bit", lm.trainable_parameters(), lr=2e-4)

The LoRA parameters of a LoraModel are ordinary nn.Parameters, so any torch optimizer works
on them; this helper only saves the import and names the package to install when one is
missing. Paged optimizers (bitsandbytes) keep their state in CUDA unified memory that the
driver pages out to CPU RAM under pressure, which is how QLoRA survives memory spikes; on a
machine without CUDA bitsandbytes runs them as plain (unpaged) optimizers and warns.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

import torch


def _torch_adamw(params, lr, **kw):
    return torch.optim.AdamW(params, lr=lr, **kw)


def _bitsandbytes(name: str) -> Callable:
    def make(params, lr, **kw):
        return getattr(_require("bitsandbytes.optim"), name)(params, lr=lr, **kw)

    return make


def _torchao_adamw8bit(params, lr, **kw):
    return _require("torchao.optim").AdamW8bit(params, lr=lr, **kw)


def _torchao_cpu_offload_adamw(params, lr, **kw):
    """torchao keeps the AdamW state and step on the CPU and the parameters on the GPU."""
    return _require("torchao.optim").CPUOffloadOptimizer(params, torch.optim.AdamW, lr=lr, **kw)


OPTIMIZERS: dict[str, Callable] = {
    "adamw": _torch_adamw,
    "adamw8bit": _bitsandbytes("AdamW8bit"),
    "paged_adamw": _bitsandbytes("PagedAdamW"),
    "paged_adamw8bit": _bitsandbytes("PagedAdamW8bit"),
    "torchao_adamw8bit": _torchao_adamw8bit,
    "cpu_offload_adamw": _torchao_cpu_offload_adamw,
}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, **kw) -> torch.optim.Optimizer:
    """The optimizer called `name` over `params`; `kw` goes to its constructor (betas, weight_decay, ...).

    Names: adamw (torch), adamw8bit / paged_adamw / paged_adamw8bit (bitsandbytes),
    torchao_adamw8bit / cpu_offload_adamw (torchao). Raises ValueError for an unknown name
    and ImportError naming the package when the optimizer's package is not installed.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown: allowed are {', '.join(map(repr, OPTIMIZERS))}")
    params = list(params)
    if not params:
        raise ValueError(f"make_optimizer({name!r}) got no parameters; pass lm.trainable_parameters()")
    return OPTIMIZERS[name](params, lr, **kw)


def _require(module: str):
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this optimizer needs {package}, which is not installed: pip install {package}") from e
