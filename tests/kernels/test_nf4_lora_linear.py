"""Tests for kernels/nf4_lora_linear.py (and the NF4 parts of kernels/lora_matmul.py, kernels/nf4.py).

Without a GPU the Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET=1 must be
set before triton is imported, so one subprocess runs this file as a script: it routes the
ops' CPU dispatch to their CUDA implementations (the Triton launchers), runs every case of
CASES forward and backward next to the plain-PyTorch reference under autograd, and saves
both; the parametrized tests compare them with the tolerance table. The CPU op tests, the
sm_90 compile check and the GPU tests run in the pytest process.
"""

import dataclasses
import sys

import pytest
import torch
from interpreter import GPU_TOLERANCE, TOLERANCE, interpret_cases, interpreted_results

from lorafx.kernels import lora_matmul as LM
from lorafx.kernels import nf4 as NF4
from lorafx.kernels import nf4_lora_linear as K
from lorafx.formats.nf4 import quantize_nf4

OP = torch.ops.lorafx.nf4_lora_linear.default


@dataclasses.dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    r: int | None  # None: no LoRA (a plain NF4 linear)
    dtype: torch.dtype
    bias: bool = False
    x_lora: bool = False  # the LoRA branch reads its own input (a dropout's output)
    blocksize: int = 64
    double_quant: bool = True
    config: tuple | None = None  # (BM, BN, BK, SPLIT_K, GROUP_M): pin a tile config

    def __str__(self):
        parts = [f"m{self.m}k{self.k}n{self.n}", f"r{self.r}", str(self.dtype).split(".")[1]]
        parts += [name for name in ("bias", "x_lora") if getattr(self, name)]
        parts += [f"bs{self.blocksize}"] if self.blocksize != 64 else []
        parts += ["no_dq"] if not self.double_quant else []
        return "-".join(parts + ([f"cfg{'x'.join(map(str, self.config))}"] if self.config else []))


# M <= 16 takes the GEMV configs (split-K, atomics), larger M the GEMM ones. K and N are not
# multiples of 64 where NF4's flat layout allows it (N·K a multiple of the blocksize, K even),
# so NF4 blocks straddle rows (K = 50, 66, 96, 160). Pinned configs cover grouped ordering
# over several row tiles and an uneven split-K in the GEMM path (one split left empty in
# the input gradient).
CASES = [
    Case(1, 96, 40, 8, torch.float32, bias=True),
    Case(5, 64, 72, 1, torch.bfloat16, x_lora=True),
    Case(1, 50, 64, 64, torch.bfloat16, double_quant=False),
    Case(16, 96, 40, 8, torch.float16, bias=True),
    Case(17, 66, 32, 1, torch.float32, blocksize=32),
    Case(33, 160, 24, 64, torch.float32, bias=True, x_lora=True),
    Case(33, 96, 40, 8, torch.bfloat16, bias=True),
    Case(33, 48, 40, None, torch.bfloat16, blocksize=32),
    Case(5, 96, 40, None, torch.float32, bias=True),
    Case(70, 96, 72, 8, torch.float32, bias=True, config=(16, 16, 32, 1, 2)),
    Case(33, 160, 40, 8, torch.bfloat16, x_lora=True, config=(32, 32, 32, 3, 8)),
]
CASE_IDS = [str(c) for c in CASES]

# (shape, double_quant, dtype) for the dequant kernel: partial last program, several nested groups.
DEQUANT_CASES = [((40, 96), True, torch.bfloat16), ((2, 96), False, torch.float32), ((130, 128), True, torch.float16)]


def make_inputs(case: Case, device="cpu", seed=0):
    """Weights scaled so outputs are O(1): W, A ~ N(0, 1/K), B ~ N(0, 1/r); scale 2."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(case.dtype).to(device)

    q = quantize_nf4(torch.randn(case.n, case.k, generator=g) / case.k**0.5, case.blocksize, case.double_quant)
    q = q.to(device)
    nf4_args = [q.packed, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, q.offset, q.blocksize]
    x = randn(case.m, case.k)
    a = b = None
    if case.r is not None:
        a, b = randn(case.r, case.k, std=case.k**-0.5), randn(case.n, case.r, std=case.r**-0.5)
    bias = randn(case.n) if case.bias else None
    x_lora = randn(case.m, case.k) if case.x_lora else None
    dy = randn(case.m, case.n)
    return x, nf4_args, [case.n, case.k], a, b, bias, x_lora, dy


def forward_and_grads(fn, x, nf4_args, shape, a, b, bias, x_lora, dy) -> dict[str, torch.Tensor]:
    """y and the gradients of every floating input of ``fn`` (the op or the reference)."""
    leaves = {"x": x, "A": a, "B": b, "bias": bias, "x_lora": x_lora}
    leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items() if t is not None}
    lora = (leaves.get("A"), leaves.get("B"), 2.0)
    y = fn(leaves["x"], *nf4_args, shape, *lora, leaves.get("bias"), leaves.get("x_lora"))
    y.backward(dy)
    return {"y": y.detach(), **{f"d{name}": t.grad for name, t in leaves.items()}}


def run_case(case: Case) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(kernel, reference) per output. Pinned configs call the launchers directly."""
    x, nf4_args, shape, a, b, bias, x_lora, dy = make_inputs(case)
    ref = forward_and_grads(K.nf4_lora_linear_reference, x, nf4_args, shape, a, b, bias, x_lora, dy)
    if case.config is None:
        got = forward_and_grads(OP, x, nf4_args, shape, a, b, bias, x_lora, dy)
        return {name: (got[name], ref[name]) for name in ref}
    config = LM._config(*case.config[:4], warps=4, stages=1, group_m=case.config[4])
    weight = LM.NF4Operand(*nf4_args)
    y = K.nf4_lora_linear_triton(x, weight, shape, a, b, 2.0, bias, x_lora, config=config)
    u = dy @ b
    dx = K.nf4_lora_linear_grad_input_triton(dy, weight, shape, None if case.x_lora else u, a, 2.0, config=config)
    dx_ref = K.nf4_lora_linear_grad_input_reference(dy, *nf4_args, shape, None if case.x_lora else u, a, 2.0)
    return {"y": (y, ref["y"]), "dx": (dx, dx_ref)}


def run_dequant_case(shape, double_quant, dtype):
    q = quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(1)), 64, double_quant)
    args = (q.packed, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, q.offset, 64, list(shape), dtype)
    return NF4.nf4_dequant_triton(*args), NF4.dequantize_nf4(*args)


def interpret_all(path: str) -> None:
    """The subprocess: every case through the interpreted kernels, results saved to ``path``."""

    def dequant_results():
        results = {}
        for i, dequant_case in enumerate(DEQUANT_CASES):
            results[f"dequant{i}/kernel"], results[f"dequant{i}/ref"] = run_dequant_case(*dequant_case)
        return results

    launchers = {"lorafx::nf4_lora_linear": K.nf4_lora_linear_cuda,
         "lorafx::nf4_lora_linear_grad_input": K.nf4_lora_linear_grad_input_cuda}
    interpret_cases(path, launchers, CASES, CASE_IDS, run_case, dequant_results)


@pytest.fixture(scope="module")
def interpreted():
    """Results of the interpreter subprocess (about 30 s on two cores)."""
    return interpreted_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_interpreted_kernels_match_reference_forward_and_gradients(interpreted, case):
    atol, rtol = TOLERANCE[case.dtype]
    names = sorted({key.split("/")[1] for key in interpreted if key.startswith(f"{case}/")})
    expected = ["dx", "y"]
    if not case.config:
        expected += ["dA", "dB"] * (case.r is not None) + ["dbias"] * case.bias + ["dx_lora"] * case.x_lora
    assert names == sorted(expected)
    for name in names:
        got, ref = interpreted[f"{case}/{name}/kernel"], interpreted[f"{case}/{name}/ref"]
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("i", range(len(DEQUANT_CASES)), ids=[f"{s}-{d}" for s, _, d in DEQUANT_CASES])
def test_interpreted_dequant_kernel_matches_reference(interpreted, i):
    got, ref = interpreted[f"dequant{i}/kernel"], interpreted[f"dequant{i}/ref"]
    if ref.dtype == torch.bfloat16:  # the interpreter truncates float32 -> bfloat16 (GPUs round)
        torch.testing.assert_close(got, ref, atol=0, rtol=2**-7)
    else:
        assert torch.equal(got, ref)


# -- the op on CPU: reference path, autograd, export, compile, errors -----------------------------


def test_cpu_op_is_the_unfused_arithmetic_with_its_gradients():
    case = Case(6, 96, 40, 8, torch.float32, bias=True, x_lora=True)
    x, nf4_args, shape, a, b, bias, x_lora, dy = make_inputs(case)

    def unfused(x, *args):
        *nf4, shape, a, b, scale, bias, x_lora = args
        w = torch.ops.lorafx.nf4_dequant(*nf4, shape, x.dtype)
        base = torch.nn.functional.linear(x, w, bias)
        return base + torch.nn.functional.linear(torch.nn.functional.linear(x_lora, a), b) * scale

    got = forward_and_grads(OP, x, nf4_args, shape, a, b, bias, x_lora, dy)
    ref = forward_and_grads(unfused, x, nf4_args, shape, a, b, bias, x_lora, dy)
    assert got.keys() == ref.keys() == {"y", "dx", "dA", "dB", "dbias", "dx_lora"}
    torch.testing.assert_close(got["y"], ref["y"], rtol=0, atol=0)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6)


class QLoraLinear(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        x, nf4_args, self.shape, a, b, bias, _, _ = make_inputs(case)
        for name, t in zip(("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset"), nf4_args):
            self.register_buffer(name, t)
        self.blocksize = nf4_args[-1]
        self.A, self.B = torch.nn.Parameter(a), torch.nn.Parameter(b)

    def forward(self, x):
        nf4 = (self.packed, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, self.offset)
        return OP(x, *nf4, self.blocksize, self.shape, self.A, self.B, 2.0, None, None)


def test_export_keeps_one_node_and_compile_trains_through_it():
    layer = QLoraLinear(Case(4, 64, 32, 4, torch.float32))
    ep = torch.export.export(layer, (torch.randn(2, 3, 64),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [OP]
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 64, requires_grad=True)
    compiled(x).square().sum().backward()
    grads = [x.grad, layer.A.grad, layer.B.grad]
    x.grad = layer.A.grad = layer.B.grad = None
    layer(x).square().sum().backward()
    for got, ref in zip(grads, [x.grad, layer.A.grad, layer.B.grad]):
        torch.testing.assert_close(got, ref)


def test_fake_tensor_shape_and_bad_inputs_name_the_shapes():
    case = Case(4, 64, 32, 4, torch.float32)
    x, nf4_args, shape, a, b, bias, _, _ = make_inputs(case)
    mode = torch._subclasses.FakeTensorMode()
    fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in (x.view(2, 2, 64), *nf4_args, a, b)]
    with mode:
        assert OP(*fake[:-2], shape, *fake[-2:], 2.0, None, None).shape == (2, 2, 32)
    with pytest.raises(ValueError, match=r"x has shape \(4, 66\); its last dimension must be in_features=64"):
        OP(torch.randn(4, 66), *nf4_args, shape, a, b, 2.0, None, None)
    with pytest.raises(ValueError, match=r"A has shape \(4, 64\) and B \(32, 3\)"):
        OP(x, *nf4_args, shape, a, b[:, :3], 2.0, None, None)
    with pytest.raises(ValueError, match="give both LoRA factors A and B or neither"):
        OP(x, *nf4_args, shape, a, None, 2.0, None, None)
    with pytest.raises(ValueError, match="A is torch.bfloat16 but x is torch.float32"):
        OP(x, *nf4_args, shape, a.bfloat16(), b, 2.0, None, None)
    with pytest.raises(ValueError, match=r"bias has shape \(31,\); expected \(32,\)"):
        OP(x, *nf4_args, shape, a, b, 2.0, torch.randn(31), None)
    with pytest.raises(ValueError, match="in_features must be even"):
        q = quantize_nf4(torch.randn(64, 33))
        OP(torch.randn(2, 33), q.packed, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, q.offset, 64,
           [64, 33], None, None, 1.0, None, None)  # fmt: skip
    with pytest.raises(ValueError, match=r"packed is torch.uint8 with 1024 elements; expected torch.uint8 with 512"):
        OP(x, *nf4_args, [32, 32], a, b, 2.0, None, None)


# -- GPU lowering without a GPU: the first config of each list compiles for sm_90 ---------------

_H100_SHARED = 227 * 1024  # the most shared memory one block may use on sm_90


@pytest.mark.parametrize(("shape", "transpose_w"), [("gemm", False), ("gemm", True), ("gemv", False)])
def test_nf4_matmul_kernels_compile_for_sm90_without_spills(shape, transpose_w):
    usage = LM.resource_usage(shape, "nf4", LM._CONFIGS[shape, "nf4"][0], transpose_w=transpose_w)
    assert usage.stack == 0 and usage.shared <= _H100_SHARED, usage


def test_dequant_kernel_compiles_for_sm90_without_spills():
    usage = NF4.dequant_resource_usage(NF4._nf4_dequant.configs[-1])
    assert usage.stack == 0 and usage.shared <= _H100_SHARED, usage


# -- GPU: the real kernels on realistic shapes ----------------------------------------------------

GPU_CASES = [
    Case(1, 4096, 4096, 16, torch.bfloat16),
    Case(16, 4096, 11008, 16, torch.bfloat16, bias=True),
    Case(512, 4096, 4096, 16, torch.bfloat16, x_lora=True),
    Case(300, 11008, 4096, 64, torch.bfloat16),
    Case(257, 4096, 14336, None, torch.bfloat16),
    Case(128, 4096, 4096, 16, torch.float32, bias=True),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c) for c in GPU_CASES])
def test_gpu_kernels_match_reference(case):
    inputs = make_inputs(case, device="cuda")
    got = forward_and_grads(OP, *inputs)
    ref = forward_and_grads(K.nf4_lora_linear_reference, *inputs)
    atol, rtol = GPU_TOLERANCE[case.dtype]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_dequant_is_bit_identical_to_reference(dtype):
    q = quantize_nf4(torch.randn(4096, 11008, device="cuda"))
    args = (q.packed, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, q.offset, 64, list(q.shape), dtype)
    assert torch.equal(torch.ops.lorafx.nf4_dequant(*args), NF4.dequantize_nf4(*args))


if __name__ == "__main__":
    interpret_all(sys.argv[1])
