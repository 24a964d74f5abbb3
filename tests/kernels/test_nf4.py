"""Tests for kernels/nf4.py: the NF4 reference math and the lorafx::nf4_dequant op."""

import pytest
import torch

from lorafx.kernels import nf4 as K
from lorafx.formats.nf4 import quantize_nf4

OP = torch.ops.lorafx.nf4_dequant.default

SHAPES = [(64, 64), (1, 4096), (3, 96), (96, 48), (2, 3, 32), (64 * 300,)]


def op_args(q):
    """The op's positional arguments for an NF4Weight."""
    return (
        q.packed,
        q.absmax,
        q.quant_map,
        q.nested_absmax,
        q.nested_quant_map,
        q.offset,
        q.blocksize,
        list(q.shape),
        q.dtype,
    )


class NF4Linear(torch.nn.Module):
    """A linear layer whose frozen weight lives as NF4 buffers, as a QLoRA base layer does."""

    def __init__(self, q):
        super().__init__()
        self.meta = (q.blocksize, list(q.shape), q.dtype)
        for name in ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset"):
            self.register_buffer(name, getattr(q, name))

    def forward(self, x):
        w = OP(
            self.packed, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, self.offset, *self.meta
        )
        return torch.nn.functional.linear(x, w)


def test_nf4_code_table_is_sorted_with_exact_zero_and_unit_ends():
    assert K.NF4_CODE.dtype == torch.float32 and K.NF4_CODE.shape == (16,)
    assert torch.all(K.NF4_CODE[1:] > K.NF4_CODE[:-1])
    assert (K.NF4_CODE[0], K.NF4_CODE[7], K.NF4_CODE[15]) == (-1.0, 0.0, 1.0)


def test_dynamic_map_shape_and_known_values():
    m = K.DYNAMIC_MAP
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert torch.all(m[1:] > m[:-1])
    assert m[-1] == 1.0 and (m == 0).sum() == 1
    assert m[0].item() == pytest.approx(-0.99297, abs=1e-5)


def test_dynamic_map_and_nf4_table_equal_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(K.DYNAMIC_MAP, F.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8))
    assert torch.equal(K.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))


def test_nibble_order_high_nibble_first():
    codes = torch.arange(64) % 16
    w = K.NF4_CODE[codes]  # absmax is exactly 1.0, so each value is its own code
    packed, absmax = K.quantize_nf4_blocks(w, 64)
    assert absmax.tolist() == [1.0]
    expected = (codes[0::2] << 4) | codes[1::2]
    assert torch.equal(packed, expected.to(torch.uint8).reshape(-1, 1))


def test_value_on_a_midpoint_goes_to_the_lower_code():
    mid = (K.NF4_CODE[:-1] + K.NF4_CODE[1:]) / 2
    above = torch.nextafter(mid, torch.tensor(2.0))
    w = torch.cat([torch.tensor([1.0]), mid, above, torch.zeros(64 - 1 - 30)])
    packed, _ = K.quantize_nf4_blocks(w, 64)
    codes = torch.stack((packed.reshape(-1) >> 4, packed.reshape(-1) & 15), 1).reshape(-1).long()
    assert codes[1:16].tolist() == list(range(15))
    assert codes[16:31].tolist() == list(range(1, 16))


def test_all_zero_block_packs_to_0x77_with_zero_absmax():
    w = torch.cat([torch.zeros(128), torch.randn(64)])
    packed, absmax = K.quantize_nf4_blocks(w, 64)
    assert torch.all(packed[:64] == 0x77)
    assert absmax[:2].tolist() == [0.0, 0.0]


def test_double_quant_group_with_zero_scale_gets_code_zero():
    codes, nested_absmax, offset = K.double_quantize_absmax(torch.full((300,), 0.5))
    assert offset.item() == 0.5
    assert nested_absmax.tolist() == [0.0, 0.0]
    assert torch.all(codes == 0)
    restored = K.dequantize_absmax(codes, nested_absmax, K.DYNAMIC_MAP, offset)
    assert torch.all(restored == 0.5)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_op_matches_reference(shape, dtype, double_quant):
    q = quantize_nf4(torch.randn(shape).to(dtype), blocksize=32, double_quant=double_quant)
    out = OP(*op_args(q))
    ref = K.dequantize_nf4(*op_args(q))
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out, ref)


def test_opcheck():
    """torch.library's own consistency checks: schema, fake tensor, autograd registration, AOT dispatch."""
    for double_quant in (True, False):
        q = quantize_nf4(torch.randn(32, 64), double_quant=double_quant)
        torch.library.opcheck(OP, op_args(q))


def test_fake_implementation_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = quantize_nf4(torch.randn(96, 64).bfloat16())
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in op_args(q)]
        out = OP(*fake_args)
    assert out.shape == (96, 64) and out.dtype == torch.bfloat16


def test_meta_device_dequantizes_to_meta():
    q = quantize_nf4(torch.randn(64, 64)).to("meta")
    out = q.dequantize()
    assert out.device.type == "meta" and out.shape == (64, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(1, a[1][:-1]), "absmax is torch.uint8 with 63 elements"),
        (lambda a: a.__setitem__(3, None), "nested_absmax missing"),
        (lambda a: a.__setitem__(6, 48), "blocksize=48 is invalid"),
        (lambda a: a.__setitem__(7, [3, 7]), "a positive multiple of blocksize=64"),
        (lambda a: a.__setitem__(0, a[0][:-1]), "packed is torch.uint8 with 2047 elements"),
        (lambda a: a.__setitem__(2, a[2].double()), "quant_map is torch.float64"),
    ],
)
def test_op_rejects_inconsistent_arguments(change, message):
    args = list(op_args(quantize_nf4(torch.randn(64, 64))))
    change(args)
    with pytest.raises(ValueError, match=message):
        OP(*args)


def test_op_rejects_nested_tensors_without_double_quant():
    args = list(op_args(quantize_nf4(torch.randn(64, 64), double_quant=False)))
    args[5] = torch.tensor(0.0)
    with pytest.raises(ValueError, match="offset given; expected None"):
        OP(*args)


def test_export_shows_one_nf4_dequant_node():
    module = NF4Linear(quantize_nf4(torch.randn(48, 64)))
    x = torch.randn(5, 64)
    ep = torch.export.export(module, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == 1
    assert torch.equal(ep.module()(x), module(x))


def test_export_checks_arguments_at_trace_time():
    q = quantize_nf4(torch.randn(48, 64))
    module = NF4Linear(q)
    module.absmax = q.absmax[:-1]
    with pytest.raises(ValueError, match="absmax is torch.uint8 with 47 elements"):
        torch.export.export(module, (torch.randn(5, 64),))


def test_torch_compile_sees_one_op_node():
    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    module = NF4Linear(quantize_nf4(torch.randn(48, 64)))
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    out = torch.compile(module, backend=recording_backend, fullgraph=True)(x)
    assert seen.count(OP) == 1
    assert torch.equal(out, module(x))


def test_gradient_flows_to_input_not_storage():
    q = quantize_nf4(torch.randn(48, 64))
    module = NF4Linear(q)
    x = torch.randn(5, 64, requires_grad=True)
    module(x).square().sum().backward()

    dense = q.dequantize()
    assert not dense.requires_grad
    x_ref = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_ref, dense).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_reference(dtype):
    q = quantize_nf4(torch.randn(256, 320).to(dtype))
    expected = q.dequantize()
    assert torch.equal(q.to("cuda").dequantize().cpu(), expected)


# The fast CPU path (dequantize_nf4_cpu, the op's CPU kernel) against the reference and bitsandbytes.
# Shapes: tiny; 768 blocks of 64 (one chunk in two multiply pieces, the second partial); 16+
# chunks with a short last one (the threaded path); a single block of 4096.
CPU_CASES = [((3, 96), 32), ((96, 512), 64), ((96, 512), 128), ((1, 4096), 256), ((1027, 1024), 64), ((2, 4096), 4096)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 vs 0.0 (or NaN payloads) would count as differences."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, blocksize", CPU_CASES)
def test_cpu_path_has_the_reference_bits(shape, blocksize, dtype, double_quant, monkeypatch):
    monkeypatch.setattr(K, "_thread_count", lambda chunks: 3)  # threads even where torch has 1
    q = quantize_nf4(torch.randn(shape).to(dtype), blocksize=blocksize, double_quant=double_quant)
    out = K.dequantize_nf4_cpu(*op_args(q))
    ref = K.dequantize_nf4(*op_args(q))
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(bits(out), bits(ref))
    assert torch.equal(bits(OP(*op_args(q))), bits(ref))  # the op's CPU kernel is this path


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 1024])
def test_cpu_path_has_bitsandbytes_bits_on_its_own_state(blocksize, dtype, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    # Flat (1, numel): bnb's CPU kernel indexes absmax per row on AVX-512 (FORMATS.md).
    w = torch.randn(1, 96 * 1024 + 3 * blocksize).to(dtype)
    packed, s = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    nested = (s.state2.absmax, s.state2.code, s.offset.reshape(())) if double_quant else (None, None, None)
    ours = OP(packed, s.absmax, s.code, *nested, blocksize, list(w.shape), dtype)
    assert torch.equal(bits(ours), bits(F.dequantize_4bit(packed, s)))


def test_cpu_path_under_inference_mode_and_in_autograd():
    q = quantize_nf4(torch.randn(1027, 1024), blocksize=64)
    ref = K.dequantize_nf4(*op_args(q))
    with torch.inference_mode():
        assert torch.equal(OP(*op_args(q)), ref)
    x = torch.randn(3, 1024, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x, OP(*op_args(q))).square().sum().backward()
    torch.nn.functional.linear(x_ref, ref).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_cpu_path_keeps_no_dequantized_weight_alive():
    from torch.multiprocessing.reductions import StorageWeakRef

    q = quantize_nf4(torch.randn(1027, 1024).bfloat16(), blocksize=64)
    out = OP(*op_args(q))
    storage = StorageWeakRef(out.untyped_storage())
    del out
    assert storage.expired()
