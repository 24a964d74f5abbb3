"""Tests for kernels/multi_lora.py: many LoRA adapters in one batch.

The torch reference is checked against a row-by-row loop of plain F.linear, the op on CPU
against the reference (forward and x gradient), and every bad input for its message. As
in test_lora_linear.py, one subprocess runs this file as a script under TRITON_INTERPRET=1
(set before triton is imported), routes the op's CPU dispatch to its Triton launcher, runs
CASES forward and backward next to the reference and saves both; the parametrized tests
compare them.
"""

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from interpreter import GPU_TOLERANCE, TOLERANCE, interpret_cases, interpreted_results
from torch._subclasses.fake_tensor import FakeTensorMode

from lorafx.kernels import multi_lora as M
from lorafx.kernels.triton_launch import compiled_resources

OP = torch.ops.lorafx.multi_lora.default


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple  # x's leading dimensions, flattened to T rows
    d_in: int
    d_out: int
    ranks: tuple  # one per adapter; the bank zero-pads them to the largest
    ids: tuple  # one per group of T // len(ids) rows; -1 = no adapter
    dtype: torch.dtype
    shrink: tuple | None = None  # (BM, BK, SPLIT_K) and
    expand: tuple | None = None  # (BM, BN): pin tile configs (calls the launcher directly)

    def __str__(self):
        parts = ["x" + "x".join(map(str, self.lead)), f"in{self.d_in}", f"out{self.d_out}"]
        parts += ["r" + ".".join(map(str, self.ranks)), "ids" + ".".join(map(str, self.ids))]
        parts.append(str(self.dtype).split(".")[1])
        if self.shrink:
            parts.append(f"cfg{'x'.join(map(str, self.shrink))}-{'x'.join(map(str, self.expand))}")
        return "-".join(parts)


CASES = [
    Case((1,), 40, 24, (1,), (0,), torch.float32),  # T = 1, r = 1, n = 1
    Case((5,), 72, 100, (8, 8, 8), (2, -1, 0, 2, 1), torch.bfloat16),  # decoding: one id per row
    Case((3, 7), 96, 40, (16, 3, 16, 8), (1, -1, 3), torch.float32),  # 3-D, mixed ranks, T = 21
    Case((40,), 45, 130, (1, 8, 16, 4, 16, 2, 8, 16), (7, 5), torch.bfloat16),  # n = 8, groups of 20 rows
    Case((2, 5), 48, 64, (16, 16), (1, 0), torch.float16),
    Case((2, 3), 64, 48, (4, 4), (-1, -1), torch.float32),  # no adapter anywhere: zeros
    Case((4, 9), 100, 33, (8, 8, 8, 8), (0, 3, 3, -1), torch.bfloat16, shrink=(32, 32, 1), expand=(32, 32)),
    Case((6,), 100, 70, (16, 16), (1, 0, 1, -1, 0, 0), torch.float32, shrink=(16, 32, 3), expand=(16, 64)),
    Case((2, 17), 24, 20, (8, 8, 8), (2, 0), torch.float32, shrink=(16, 16, 1), expand=(16, 16)),  # 16 + 1 rows
]
CASE_IDS = [str(c) for c in CASES]


def make_inputs(case: Case, device="cpu", seed=0):
    """x, A, B, scales, ids, dy; A[k] ~ N(0, 1/in) and B[k] ~ N(0, 1/r_k) so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    n, r = len(case.ranks), max(case.ranks)
    A, B = torch.zeros(n, r, case.d_in), torch.zeros(n, case.d_out, r)
    for k, rank in enumerate(case.ranks):
        A[k, :rank] = torch.randn(rank, case.d_in, generator=g) * case.d_in**-0.5
        B[k, :, :rank] = torch.randn(case.d_out, rank, generator=g) * rank**-0.5
    scales = 0.5 + torch.rand(n, generator=g)
    x = torch.randn(*case.lead, case.d_in, generator=g)
    dy = torch.randn(*case.lead, case.d_out, generator=g)
    ids = torch.tensor(case.ids, dtype=torch.int64)
    x, A, B, dy = (t.to(case.dtype).to(device) for t in (x, A, B, dy))
    return x, A, B, scales.to(device), ids.to(device), dy


def forward_and_dx(fn, x, A, B, scales, ids, dy) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = fn(x, A, B, scales, ids)
    if y.requires_grad:  # not when the reference meets no adapter at all: y is zeros, independent of x
        y.backward(dy)
    return {"y": y.detach(), "dx": torch.zeros_like(x) if x.grad is None else x.grad}


def row_by_row(x, A, B, scales, ids):
    """The semantics spelled out: each row through its adapter's two F.linear, or zeros."""
    x2 = x.reshape(-1, x.shape[-1])
    per_id = x2.shape[0] // len(ids)
    rows = []
    for t in range(x2.shape[0]):
        k = int(ids[t // per_id])
        rows.append(x2.new_zeros(B.shape[1]) if k == -1 else F.linear(F.linear(x2[t], A[k]), B[k]) * scales[k])
    return torch.stack(rows).reshape(*x.shape[:-1], B.shape[1])


def run_case(case: Case) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(kernel, reference) per output. Pinned configs call the launcher, dx with transposed banks."""
    x, A, B, scales, ids, dy = make_inputs(case)
    ref = forward_and_dx(M.multi_lora_reference, x, A, B, scales, ids, dy)
    if case.shrink is None:
        got = forward_and_dx(OP, x, A, B, scales, ids, dy)
        return {name: (got[name], ref[name]) for name in ref}
    configs = M._shrink_config(*case.shrink, warps=4, stages=1), M._expand_config(*case.expand, warps=4)
    y = M.multi_lora_triton(x, A, B, scales, ids, *configs)
    dx = M.multi_lora_triton(dy, B.transpose(1, 2), A.transpose(1, 2), scales, ids, *configs)
    return {"y": (y, ref["y"]), "dx": (dx, ref["dx"])}


def interpret_all(path: str) -> None:
    """The subprocess: every case through the interpreted kernels, results saved to ``path``."""
    interpret_cases(path, {"lorafx::multi_lora": M.multi_lora_cuda}, CASES, CASE_IDS, run_case)


@pytest.fixture(scope="module")
def interpreted():
    """Results of the interpreter subprocess (about 10 s on two cores)."""
    return interpreted_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_interpreted_kernels_match_reference_forward_and_x_gradient(interpreted, case):
    atol, rtol = TOLERANCE[case.dtype]
    for name in ("y", "dx"):
        got, ref = interpreted[f"{case}/{name}/kernel"], interpreted[f"{case}/{name}/ref"]
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        if -1 in case.ids:  # rows without an adapter are exactly zero, not merely close
            per_id = got.reshape(len(case.ids), -1)
            assert not per_id[torch.tensor(case.ids) == -1].any()


# -- the reference and the op on CPU ---------------------------------------------------------------

CPU_CASES = [c for c in CASES if c.dtype == torch.float32 and c.shrink is None]


@pytest.mark.parametrize("case", CPU_CASES, ids=[str(c) for c in CPU_CASES])
def test_reference_matches_row_by_row_linear(case):
    x, A, B, scales, ids, _ = make_inputs(case)
    torch.testing.assert_close(M.multi_lora_reference(x, A, B, scales, ids), row_by_row(x, A, B, scales, ids),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_ids_per_batch_row_serve_3d_x_and_its_flattened_view_alike():
    x, A, B, scales, ids, _ = make_inputs(Case((3, 7), 96, 40, (16, 3, 16, 8), (1, -1, 3), torch.float32))
    y3 = OP(x, A, B, scales, ids)
    assert y3.shape == (3, 7, 40)
    torch.testing.assert_close(OP(x.reshape(21, 96), A, B, scales, ids), y3.reshape(21, 40), atol=0, rtol=0)


def test_zero_padded_ranks_match_each_adapter_alone_on_its_rows():
    case = Case((4, 5), 32, 24, (2, 16, 5), (2, 0, 1, 2), torch.float32)
    x, A, B, scales, ids, _ = make_inputs(case)
    y = M.multi_lora_reference(x, A, B, scales, ids)
    for k, rank in enumerate(case.ranks):
        rows = ids == k
        alone = F.linear(F.linear(x[rows], A[k, :rank]), B[k, :, :rank]) * scales[k]
        torch.testing.assert_close(y[rows], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")  # float32 on purpose
def test_cpu_op_is_the_reference_and_its_x_gradient_checks_numerically():
    inputs = make_inputs(Case((2, 3), 12, 10, (4, 2, 4), (2, -1), torch.float32))
    x, A, B, scales, ids, _ = inputs
    got, ref = forward_and_dx(OP, *inputs), forward_and_dx(M.multi_lora_reference, *inputs)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-6)
    # y is linear in x, so central differences are exact up to float32 rounding.
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: OP(x, A, B, scales, ids), x, eps=1e-2, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("bank", ["A", "B", "scales"])
def test_banks_are_frozen(bank):
    x, A, B, scales, ids, _ = make_inputs(Case((2,), 8, 6, (4, 4), (0, 1), torch.float32))
    inputs = {"A": A, "B": B, "scales": scales}
    inputs[bank].requires_grad_()
    with pytest.raises(ValueError, match=rf"{bank} requires grad, but adapter banks are frozen.*single adapter"):
        OP(x, inputs["A"], inputs["B"], inputs["scales"], ids)


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_opcheck(x_requires_grad):
    x, A, B, scales, ids, _ = make_inputs(Case((2, 3), 16, 12, (4, 8), (1, -1), torch.float32))
    torch.library.opcheck(OP, (x.requires_grad_(x_requires_grad), A, B, scales, ids))


def test_fake_impl_checks_shapes_but_leaves_id_values_alone():
    inputs = make_inputs(Case((2, 3), 16, 12, (4, 8), (1, 0), torch.float32))[:5]
    with FakeTensorMode() as mode:
        x, A, B, scales, _ = (mode.from_tensor(t) for t in inputs)
        ids = mode.from_tensor(torch.tensor([5, -7]))  # values a fake tensor cannot read
        assert OP(x, A, B, scales, ids).shape == (2, 3, 12)
        with pytest.raises(ValueError, match=r"x has shape \(2, 3, 15\)"):
            OP(x[..., :15], A, B, scales, ids)


def test_export_keeps_one_node():
    class MultiLora(torch.nn.Module):
        def __init__(self):
            super().__init__()
            _, A, B, scales, _, _ = make_inputs(Case((1,), 16, 12, (4, 8), (0,), torch.float32))
            for name, t in {"A": A, "B": B, "scales": scales}.items():
                self.register_buffer(name, t)

        def forward(self, x, ids):
            return OP(x, self.A, self.B, self.scales, ids)

    ep = torch.export.export(MultiLora(), (torch.randn(3, 5, 16), torch.tensor([1, -1, 0])))
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"] == [OP]


BAD_INPUTS = {  # name: (argument, its change, message); the good x is (2, 3, 8), A (3, 4, 8), B (3, 6, 4)
    "x-int": ("x", lambda t: t.long(), r"x is torch.int64; allowed: torch.float32"),
    "A-2d": ("A", lambda t: t[0], r"A has shape \(4, 8\) and B \(3, 6, 4\); expected banks"),
    "B-n": ("B", lambda t: t[:2], r"banks disagree: A has shape \(3, 4, 8\) .* but B \(2, 6, 4\)"),
    "B-r": ("B", lambda t: t[..., :3], r"banks disagree: .* expected B \(3, out, 4\)"),
    "x-in": ("x", lambda t: t[..., :7], r"x has shape \(2, 3, 7\); its last dimension must be in=8"),
    "A-dtype": ("A", lambda t: t.double(), r"A is torch.float64 on cpu but x is torch.float32 on cpu"),
    "B-dtype": ("B", lambda t: t.bfloat16(), r"B is torch.bfloat16 on cpu but x is torch.float32"),
    "A-device": ("A", lambda t: t.to("meta"), r"A is torch.float32 on meta but x is .* on cpu"),
    "scales-shape": ("scales", lambda t: t[:2], r"scales is .* of shape \(2,\) .*expected float32 of shape \(3,\)"),
    "scales-dtype": ("scales", lambda t: t.double(), r"scales is torch.float64 .*expected float32"),
    "ids-float": ("ids", lambda t: t.float(), r"ids is torch.float32 .*expected 1-D int64"),
    "ids-2d": ("ids", lambda t: t[None], r"ids is torch.int64 of shape \(1, 2\)"),
    "ids-groups": ("ids", lambda t: t.repeat(2), r"x has 6 rows, which do not split into 4 equal groups"),
    "ids-empty": ("ids", lambda t: t[:0], r"x has 6 rows, which do not split into 0 equal groups"),
    "id-too-big": ("ids", lambda t: t + 2, r"ids holds 3, not an adapter of the 3 in the bank"),
    "id-below-minus-1": ("ids", lambda t: t - 3, r"ids holds -2, not an adapter of the 3 in the bank"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_inputs_name_the_problem(bad):
    inputs = make_inputs(Case((2, 3), 8, 6, (4, 4, 4), (1, 0), torch.float32))[:5]
    args = dict(zip(["x", "A", "B", "scales", "ids"], inputs))
    name, change, message = BAD_INPUTS[bad]
    args[name] = change(args[name])
    with pytest.raises(ValueError, match=rf"lorafx::multi_lora: {message}"):
        OP(**args)


def test_ids_read_once_per_value_but_rechecked_after_an_in_place_change():
    """The op reads the ids on the host once per version of the buffer (a decode step's layers
    share it); writing the buffer in place, as the serving engine does, is seen at once."""
    x, A, B, scales, ids, _ = make_inputs(Case((2, 3), 8, 6, (4, 4, 4), (1, 0), torch.float32))
    first = OP(x, A, B, scales, ids)
    assert torch.equal(OP(x, A, B, scales, ids), first)
    ids.copy_(torch.tensor([2, -1]))
    torch.testing.assert_close(OP(x, A, B, scales, ids), row_by_row(x, A, B, scales, ids), rtol=0, atol=1e-6)
    ids[1] = 3  # not an adapter of the 3 in the bank
    with pytest.raises(ValueError, match="ids holds 3, not an adapter of the 3 in the bank"):
        OP(x, A, B, scales, ids)


# -- GPU lowering without a GPU, and the real kernels on a GPU -------------------------------------

# bfloat16 banks, int64 ids; every other argument is an int32 size or stride.
_POINTERS = {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "ids_ptr": "*i64"}
_POINTERS.update(down_ptr="*fp32", scales_ptr="*fp32")
_KERNEL_CONFIGS = [(M._shrink_kernel, c) for c in M.SHRINK_CONFIGS] + [(M._expand_kernel, c) for c in M.EXPAND_CONFIGS]


def _config_id(kernel_config):
    kernel, config = kernel_config
    return f"{kernel.__name__.strip('_')}-{'x'.join(map(str, config.kwargs.values()))}-w{config.num_warps}"


# 64 and 128 both: ptxas spilled some candidates at R_PAD 64 and not at 128.
@pytest.mark.parametrize("r_pad", [64, 128])
@pytest.mark.parametrize(("kernel", "config"), _KERNEL_CONFIGS, ids=map(_config_id, _KERNEL_CONFIGS))
def test_kernels_compile_for_sm90_without_spills(kernel, config, r_pad):
    signature = {name: _POINTERS.get(name, "i32") for name in kernel.arg_names}
    constexprs = dict(R_PAD=r_pad, DOT_PRECISION="ieee", UPCAST_DOT=False)
    usage = compiled_resources(kernel, signature, constexprs, config, arch=90)
    assert usage.stack == 0 and usage.shared <= 227 * 1024, usage


GPU_CASES = [
    Case((64,), 4096, 4096, (16,) * 8, tuple(range(8)) * 7 + (-1,) * 8, torch.bfloat16),  # decode, 64 sequences
    Case((1,), 4096, 11008, (64,), (0,), torch.bfloat16),
    Case((4, 300), 4096, 11008, (8, 16, 64, 32), (3, 0, -1, 1), torch.bfloat16),  # prefill, mixed ranks
    Case((8, 100), 4096, 4096, (16, 16), (0, 1, 1, 0, 0, 1, -1, 0), torch.float16),
    Case((2, 129), 4096, 1024, (16,) * 4, (2, 3), torch.float32),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c) for c in GPU_CASES])
def test_gpu_kernels_match_reference(case):
    inputs = make_inputs(case, device="cuda")
    got, ref = forward_and_dx(OP, *inputs), forward_and_dx(M.multi_lora_reference, *inputs)
    atol, rtol = GPU_TOLERANCE[case.dtype]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


if __name__ == "__main__":
    interpret_all(sys.argv[1])
