"""Triton kernels on the CPU: TRITON_INTERPRET=1 in a subprocess.

The interpreter is chosen when triton starts, so the kernels run in a child process: the
test file's `__main__` calls `interpret_cases`, which routes each op's CPU dispatch to its CUDA
launcher (now interpreted) and saves every case's kernel and reference results; the test's
module fixture calls `interpreted_results(__file__)` and compares them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch
import triton
from safetensors.torch import load_file, save_file


# (atol, rtol) per dtype, kernel vs reference, for outputs of magnitude up to ~10. float32:
# both accumulate in float32, in a different order. bfloat16/float16: the kernel rounds once
# from float32 where the reference rounds every intermediate (base output, x·Aᵀ, ·Bᵀ,
# ·scale, sum), and the interpreter truncates float32 -> bfloat16 instead of rounding: up to
# two ulps of the O(5) intermediates (bfloat16: 2 · 2^-5; float16: 2 · 2^-8) where they cancel.
TOLERANCE = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (6e-2, 2e-2),
    torch.float16: (1e-2, 4e-3),
}
# On a GPU K is 4096..11008: float32 sums of that length in another order (Triton tiles vs cuBLAS).
GPU_TOLERANCE = {**TOLERANCE, torch.float32: (1e-4, 1e-4)}


def interpret_cases(path: str, launchers: dict, cases, case_ids, run_case, extra=None) -> None:
    """In the child: run_case(case) → {name: (kernel result, reference)} for every case, saved to
    `path` as "<case id>/<name>/kernel" and ".../ref"; `extra()` adds more tensors."""
    assert triton.knobs.runtime.interpret, "run with TRITON_INTERPRET=1"
    for op, launcher in launchers.items():
        torch.library.register_kernel(op, "cpu", launcher)
    results = {}
    for case, case_id in zip(cases, case_ids):
        for name, (got, ref) in run_case(case).items():
            results[f"{case_id}/{name}/kernel"], results[f"{case_id}/{name}/ref"] = got.contiguous(), ref.contiguous()
    results.update(extra() if extra else {})
    save_file(results, path)


def interpreted_results(test_file: str) -> dict[str, torch.Tensor]:
    """Run `python test_file PATH` under TRITON_INTERPRET=1 and load what it saved."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.safetensors")
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, test_file, path], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return load_file(path)
