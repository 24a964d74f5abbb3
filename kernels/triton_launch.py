"""Launching lorafx's autotuned Triton kernels, on a GPU or under ``TRITON_INTERPRET=1``,
and compiling them for a GPU that is not there (to read their resource usage).

The interpreter runs kernels on CPU tensors with numpy, which is how the kernel tests run
without a GPU. Its limits shape the launchers: it has no GPU to time autotuning candidates
on (so a launch takes the first config of the list, or the one a test names), and it
multiplies the raw bit patterns of bfloat16 ``tl.dot`` operands (triton-lang/triton#11584,
"not supported yet"), so kernels upcast dot operands to float32 when ``UPCAST_DOT`` is
set; bfloat16 values are exact in float32, so results are unchanged. It also truncates
float32 -> bfloat16 conversions where GPUs round to nearest, which the tests' bfloat16
tolerances allow for.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton

_TORCH_TO_TRITON_PRECISION = {True: "tf32", False: "ieee"}

MAX_INDEX = 2**31 - 1
"""The kernels compute element offsets in int32: no operand may span more elements than this."""


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return bool(triton.knobs.runtime.interpret)


def dot_precision() -> str:
    """``tl.dot``'s float32 input precision, following torch's own switch for float32 matmuls.

    Without this, Triton defaults to TF32 and a float32 model would silently compute in
    ~10-bit mantissas where torch computes in full float32 (torch's default).
    """
    return _TORCH_TO_TRITON_PRECISION[bool(torch.backends.cuda.matmul.allow_tf32)]


def candidate_configs(kernel: triton.runtime.Autotuner, config: triton.Config | None) -> list[triton.Config]:
    """The configs a launch may run: the one given, else the kernel's whole autotuning list."""
    return [config] if config is not None else list(kernel.configs)


def launch(kernel: triton.runtime.Autotuner, grid, *args, config: triton.Config | None = None, **kwargs) -> None:
    """Run an autotuned kernel, or its undecorated body with ``config`` when one is given.

    Under the interpreter, with no config given, the first config of the list runs: it
    cannot time candidates, and the tests that sweep tile shapes pass their own configs.
    """
    if config is None and interpreting():
        config = kernel.configs[0]
    if config is None:
        kernel[grid](*args, **kwargs)
    else:
        kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled kernel config needs per block on a GPU."""

    registers: int  # per thread
    stack: int  # bytes per thread of local memory: spilled registers
    shared: int  # bytes of shared memory


def compiled_resources(kernel, signature: dict, constexprs: dict, config: triton.Config, arch: int) -> Resources:
    """Compile one config of ``kernel`` for NVIDIA sm_<arch> and read its resource usage; no GPU needed.

    Pointers and integer arguments get the 16-divisibility hint a real launch gives them
    for aligned tensors and sizes (without it Triton does not software-pipeline the
    loads, and the numbers would describe a different kernel). Uses Triton's bundled
    NVIDIA backend and cuobjdump.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    constexprs = {**constexprs, **config.kwargs}
    sig = {name: "constexpr" if name in constexprs else signature[name] for name in names}
    hints = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if sig[name] not in ("constexpr", "fp32")}
    source = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=hints)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True)
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout).groups()
    return Resources(int(registers), int(stack), compiled.metadata.shared)
