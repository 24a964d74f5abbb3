"""Tests for kernels/lora_linear.py: the fused 16-bit linear + LoRA op and its kernels.

As in test_nf4_lora_linear.py, one subprocess runs this file as a script under
TRITON_INTERPRET=1 (set before triton is imported), routes the ops' CPU dispatch to their
Triton launchers, runs CASES forward and backward next to the reference and saves both;
the parametrized tests compare them. Dense W allows any K, odd ones included.
"""

import dataclasses
import sys

import pytest
import torch
from interpreter import GPU_TOLERANCE, TOLERANCE, interpret_cases, interpreted_results

from lorafx.kernels import lora_linear as K
from lorafx.kernels import lora_matmul as LM

OP = torch.ops.lorafx.lora_linear.default


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    bias: bool = False
    x_lora: bool = False
    config: tuple | None = None  # (BM, BN, BK, SPLIT_K, GROUP_M): pin a tile config

    def __str__(self):
        parts = [f"m{self.m}k{self.k}n{self.n}", f"r{self.r}", str(self.dtype).split(".")[1]]
        parts += [name for name in ("bias", "x_lora") if getattr(self, name)]
        return "-".join(parts + ([f"cfg{'x'.join(map(str, self.config))}"] if self.config else []))


CASES = [
    Case(1, 96, 40, 8, torch.float32, bias=True),
    Case(5, 64, 72, 1, torch.bfloat16, x_lora=True),
    Case(16, 45, 40, 64, torch.float16),
    Case(33, 160, 24, 64, torch.float32, bias=True, x_lora=True),
    Case(33, 99, 40, 8, torch.bfloat16, bias=True),
    Case(70, 96, 72, 8, torch.float32, bias=True, config=(16, 16, 32, 1, 2)),
    Case(33, 160, 40, 8, torch.bfloat16, x_lora=True, config=(32, 32, 32, 3, 8)),
]
CASE_IDS = [str(c) for c in CASES]


def make_inputs(case: Case, device="cpu", seed=0):
    """Scaled so outputs are O(1): W, A ~ N(0, 1/K), B ~ N(0, 1/r); scale 2."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(case.dtype).to(device)

    weight = randn(case.n, case.k, std=case.k**-0.5)
    a, b = randn(case.r, case.k, std=case.k**-0.5), randn(case.n, case.r, std=case.r**-0.5)
    bias = randn(case.n) if case.bias else None
    x_lora = randn(case.m, case.k) if case.x_lora else None
    return randn(case.m, case.k), weight, a, b, bias, x_lora, randn(case.m, case.n)


def forward_and_grads(fn, x, weight, a, b, bias, x_lora, dy) -> dict[str, torch.Tensor]:
    leaves = {"x": x, "A": a, "B": b, "bias": bias, "x_lora": x_lora}
    leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items() if t is not None}
    y = fn(leaves["x"], weight, leaves["A"], leaves["B"], 2.0, leaves.get("bias"), leaves.get("x_lora"))
    y.backward(dy)
    return {"y": y.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}


def run_case(case: Case) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(kernel, reference) per output. Pinned configs call the launchers directly."""
    x, weight, a, b, bias, x_lora, dy = make_inputs(case)
    ref = forward_and_grads(K.lora_linear_reference, x, weight, a, b, bias, x_lora, dy)
    if case.config is None:
        got = forward_and_grads(OP, x, weight, a, b, bias, x_lora, dy)
        return {name: (got[name], ref[name]) for name in ref}
    config = LM._config(*case.config[:4], warps=4, stages=1, group_m=case.config[4])
    u = None if case.x_lora else dy @ b
    y = K.lora_linear_triton(x, weight, a, b, 2.0, bias, x_lora, config=config)
    dx = K.lora_linear_grad_input_triton(dy, weight, u, a, 2.0, config=config)
    return {"y": (y, ref["y"]), "dx": (dx, K.lora_linear_grad_input_reference(dy, weight, u, a, 2.0))}


def interpret_all(path: str) -> None:
    """The subprocess: every case through the interpreted kernels, results saved to ``path``."""
    launchers = {"lorafx::lora_linear": K.lora_linear_cuda,
                 "lorafx::lora_linear_grad_input": K.lora_linear_grad_input_cuda}
    interpret_cases(path, launchers, CASES, CASE_IDS, run_case)


@pytest.fixture(scope="module")
def interpreted():
    """Results of the interpreter subprocess (about 20 s on two cores)."""
    return interpreted_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_interpreted_kernels_match_reference_forward_and_gradients(interpreted, case):
    atol, rtol = TOLERANCE[case.dtype]
    names = sorted({key.split("/")[1] for key in interpreted if key.startswith(f"{case}/")})
    expected = ["dx", "y"]
    if not case.config:
        expected += ["dA", "dB"] + ["dbias"] * case.bias + ["dx_lora"] * case.x_lora
    assert names == sorted(expected)
    for name in names:
        got, ref = interpreted[f"{case}/{name}/kernel"], interpreted[f"{case}/{name}/ref"]
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# -- the op on CPU ---------------------------------------------------------------------------------


def test_cpu_op_matches_unfused_arithmetic_and_gradients_including_a_trainable_weight():
    case = Case(6, 40, 24, 4, torch.float32, bias=True)
    x, weight, a, b, bias, _, dy = make_inputs(case)
    weight.requires_grad_()
    got = forward_and_grads(OP, x, weight, a, b, bias, None, dy)
    dw = weight.grad
    weight.grad = None
    ref = forward_and_grads(K.lora_linear_reference, x, weight, a, b, bias, None, dy)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, weight.grad, rtol=1e-6, atol=1e-6)


def test_export_keeps_one_node():
    class LoraLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            _, weight, a, b, bias, _, _ = make_inputs(Case(2, 32, 16, 4, torch.float32, bias=True))
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.A, self.B = torch.nn.Parameter(a), torch.nn.Parameter(b)

        def forward(self, x):
            return OP(x, self.weight, self.A, self.B, 2.0, self.bias, None)

    ep = torch.export.export(LoraLinear(), (torch.randn(3, 5, 32),))
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"] == [OP]


def test_bad_inputs_name_the_shapes():
    x, weight, a, b, bias, _, _ = make_inputs(Case(4, 32, 16, 4, torch.float32))
    with pytest.raises(ValueError, match=r"x has shape \(4, 31\); its last dimension must be in_features=32"):
        OP(x[:, :31], weight, a, b, 2.0, None, None)
    with pytest.raises(ValueError, match=r"weight is torch.bfloat16 on cpu but x is torch.float32"):
        OP(x, weight.bfloat16(), a, b, 2.0, None, None)
    with pytest.raises(ValueError, match=r"x_lora has shape \(4, 16\); expected x's shape \(4, 32\)"):
        OP(x, weight, a, b, 2.0, None, x[:, :16])
    with pytest.raises(ValueError, match=r"weight has shape \(512,\)"):
        OP(x, weight.flatten(), a, b, 2.0, None, None)


# -- GPU lowering without a GPU, and the real kernels on a GPU -------------------------------------

_H100_SHARED = 227 * 1024  # the most shared memory one block may use on sm_90


@pytest.mark.parametrize(("shape", "transpose_w"), [("gemm", False), ("gemm", True), ("gemv", False)])
def test_dense_matmul_kernels_compile_for_sm90_without_spills(shape, transpose_w):
    usage = LM.resource_usage(shape, "dense", LM._CONFIGS[shape, "dense"][0], transpose_w=transpose_w)
    assert usage.stack == 0 and usage.shared <= _H100_SHARED, usage


GPU_CASES = [
    Case(1, 4096, 4096, 16, torch.bfloat16),
    Case(16, 4096, 11008, 16, torch.bfloat16, bias=True),
    Case(4096, 4096, 4096, 16, torch.bfloat16, x_lora=True),
    Case(300, 11008, 4096, 64, torch.float16),
    Case(128, 4096, 4096, 16, torch.float32, bias=True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c) for c in GPU_CASES])
def test_gpu_kernels_match_reference(case):
    inputs = make_inputs(case, device="cuda")
    got = forward_and_grads(OP, *inputs)
    ref = forward_and_grads(K.lora_linear_reference, *inputs)
    atol, rtol = GPU_TOLERANCE[case.dtype]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


if __name__ == "__main__":
    interpret_all(sys.argv[1])
