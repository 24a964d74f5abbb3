"""The torch.compile backend "lorafx": lorafx's fusion passes, then Inductor.

    clm = torch.compile(lm, backend="lorafx")                 # no import of lorafx needed
    clm = torch.compile(lm, backend="lorafx", options={"fuse": True, "inductor_config": {...}})

pyproject registers `lorafx_backend` in the `torch_dynamo_backends` entry-point group, which
is where Dynamo looks up a backend name it does not know, so the name works right after
`pip install`.

The fusion passes run on the graph Dynamo hands over, *before* AOTAutograd: the fused ops
(`lorafx::lora_linear`, `lorafx::nf4_lora_linear`) carry their own autograd, so AOTAutograd
differentiates through them and training compiles like inference. What a pass sees there:
aten-level nodes (a LoraModel's graph traced through), parameters and NF4 buffers as
placeholders (not `get_attr`), fake tensors in `node.meta["example_value"]`, and none of the
`lorafx.*` meta tags of the transform passes, which Dynamo does not carry over. Everything
the passes leave as aten ops, and `lorafx::nf4_dequant` (run through its CPU/CUDA
implementation as an Inductor fallback kernel), goes to Inductor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch._inductor.config
from torch._dynamo.utils import counters

from lorafx.passes import CPU_COMPILE_PASSES, FUSE_PASSES
from lorafx.passes.common import PassResult



class BackendOptionsError(ValueError):
    """torch.compile(..., backend="lorafx", options=...) got an option it does not understand."""


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """What `options={...}` may set.

    fuse: run the fusion passes. None (default) fuses graphs that run on CUDA only: the
        fused ops are Triton kernels, and on CPU their plain-PyTorch path is slower than the
        code Inductor generates for the same aten ops. True forces the passes (e.g. to test
        them on CPU), False switches them off (to tell a fusion problem from an Inductor one).
        Unfused graphs run CPU_COMPILE_PASSES instead (adapter banks' multi_lora as aten ops).
    inductor_config: Inductor config patches, as `torch.compile(options=...)` takes them for
        the inductor backend, e.g. {"max_autotune": True}. Names are checked against
        `torch._inductor.config`.
    """

    fuse: bool | None = None
    inductor_config: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.fuse not in (None, True, False):
            raise BackendOptionsError(
                f"lorafx backend option fuse={self.fuse!r} is invalid: allowed is None, True or False"
            )
        if not isinstance(self.inductor_config, Mapping):
            raise BackendOptionsError(
                f"lorafx backend option inductor_config={self.inductor_config!r} is invalid: "
                "allowed is a dict of torch._inductor.config names to values"
            )
        known = torch._inductor.config.get_config_copy()
        unknown = sorted(str(k) for k in self.inductor_config if k not in known)
        if unknown:
            raise BackendOptionsError(
                f"lorafx backend option inductor_config has unknown Inductor config names {unknown}"
            )

    @classmethod
    def from_dict(cls, options: Mapping | None) -> "BackendOptions":
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise BackendOptionsError(f"lorafx backend options must be a dict, got {type(options).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in options if k not in allowed)
        if unknown:
            raise BackendOptionsError(f"lorafx backend got unknown options {unknown}; allowed: {allowed}")
        return cls(**options)


def lorafx_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None, options=None):
    """Dynamo backend: fuse LoRA (and NF4 dequant) into lorafx ops, compile the rest with Inductor.

    `mode` is torch.compile's mode ("max-autotune", ...), applied as Inductor's own presets;
    `options` is validated by BackendOptions. Counts of what each pass did accumulate in
    `torch._dynamo.utils.counters["lorafx"]` ("graphs" counts the graphs compiled), as
    Inductor records its pattern matches.
    """
    opts = BackendOptions.from_dict(options)
    config = {**(torch._inductor.list_mode_options(mode) if mode else {}), **opts.inductor_config}
    fuse = opts.fuse
    if fuse is None:
        fuse = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    for graph_pass in FUSE_PASSES if fuse else CPU_COMPILE_PASSES:
        _record(graph_pass(gm, None))
    gm.recompile()
    counters["lorafx"]["graphs"] += 1
    from torch._inductor.compile_fx import compile_fx  # heavy import, only when compiling

    return compile_fx(gm, example_inputs, config_patches=config)


def _record(result: PassResult) -> None:
    for key, value in result.counts.items():
        counters["lorafx"][f"{result.name}.{key}"] += value
