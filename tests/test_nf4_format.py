"""Tests for lorafx/formats/nf4.py: accuracy, storage cost, validation and bitsandbytes/transformers compatibility."""

import json
import math

import pytest
import torch

from lorafx.kernels.nf4 import DYNAMIC_MAP, NF4_CODE
from lorafx.formats.nf4 import NF4Weight, quantize_nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREFIX = "model.layers.0.mlp.up_proj.weight"
SUFFIXES = ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"]

# The largest error a block's scaled value can get is half the widest gap of the NF4 table
# (between -1 and -0.696): any |w| <= absmax lands within that of a code.
MAX_HALF_GAP = ((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2).item()


def predicted_rms_error_gaussian(blocksize: int) -> float:
    """RMS round-trip error of NF4 on N(0, 1) weights, derived from the code table alone.

    A block is scaled by its absmax a (for 64 Gaussian samples E[a] is about 2.6); a value
    falling in the bucket between two midpoints of width g (in scaled units) is off by a
    roughly uniform error in (-g*a/2, g*a/2), variance (g*a)^2/12. Weighting buckets by their
    Gaussian mass gives the expected squared error. The derivation ignores that one element
    per block is exact and that density varies inside a bucket, so tests allow 10% slack.
    """
    torch.manual_seed(123)
    a = torch.randn(20000, blocksize).abs().amax(dim=1).mean().item()
    code = NF4_CODE.double()
    edges = torch.cat([torch.tensor([-1.0]), (code[:-1] + code[1:]) / 2, torch.tensor([1.0])]).double()
    cdf = 0.5 * (1 + torch.erf(a * edges / math.sqrt(2)))
    mass = cdf[1:] - cdf[:-1]
    widths = edges[1:] - edges[:-1]
    return math.sqrt((mass * (widths * a) ** 2 / 12).sum().item() / mass.sum().item())


def state_dict_tensor(state: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


# ---------------------------------------------------------------- accuracy and storage


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_rms_error_on_gaussian_weights_is_as_derived(dtype):
    torch.manual_seed(0)
    w = torch.randn(1024, 1024).to(dtype)
    rms = (quantize_nf4(w).dequantize().float() - w.float()).pow(2).mean().sqrt().item()
    no_dq = (quantize_nf4(w, double_quant=False).dequantize().float() - w.float()).pow(2).mean().sqrt().item()
    assert rms <= 1.1 * predicted_rms_error_gaussian(64)
    assert rms <= 1.01 * no_dq  # double quantization costs (almost) no accuracy


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_every_element_is_within_half_the_widest_code_gap_of_its_block_absmax(blocksize):
    torch.manual_seed(1)
    w = torch.randn(256, 512) * torch.logspace(-3, 1, 256).unsqueeze(1)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    err = (q.dequantize() - w).abs().view(-1, blocksize)
    bound = (MAX_HALF_GAP + 1e-6) * q.absmax.unsqueeze(1)  # 1e-6: float32 rounding of scale and product
    assert torch.all(err <= bound)


def test_bits_per_parameter_with_double_quant_measured_from_tensor_bytes():
    q = quantize_nf4(torch.randn(2048, 2048))
    bits = q.nbytes() * 8 / (2048 * 2048)
    assert bits <= 4.13
    # 4 bits per code + 8 per 64-block absmax code + 32 per 256 codes, plus the two maps and offset.
    assert q.nbytes() == 2048 * 2048 // 2 + 2048 * 2048 // 64 + 4 * (2048 * 2048 // 64 // 256) + 4 * (16 + 256 + 1)


def test_bits_per_parameter_without_double_quant():
    q = quantize_nf4(torch.randn(2048, 2048), double_quant=False)
    assert q.nbytes() == 2048 * 2048 // 2 + 4 * (2048 * 2048 // 64) + 4 * 16


@pytest.mark.parametrize("double_quant", [True, False])
def test_all_zero_blocks_dequantize_to_exact_zeros(double_quant):
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    w[3] = 0
    w[10] = 0
    q = quantize_nf4(w, double_quant=double_quant)
    assert torch.all(q.packed.view(16, 32)[[3, 10]] == 0x77)
    out = q.dequantize()
    assert torch.all(out[[3, 10]] == 0)


@pytest.mark.parametrize("double_quant", [True, False])
def test_all_zero_weight(double_quant):
    q = quantize_nf4(torch.zeros(8, 64, dtype=torch.bfloat16), double_quant=double_quant)
    assert torch.all(q.packed == 0x77)
    out = q.dequantize()
    assert out.dtype == torch.bfloat16 and torch.all(out == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, blocksize",
    [((1, 64), 64), ((3, 96), 32), ((96, 48), 64), ((2, 3, 32), 32), ((300 * 64,), 64), ((7, 4096), 4096)],
)
def test_odd_shapes_keep_shape_and_dtype(shape, blocksize, dtype):
    torch.manual_seed(3)
    w = torch.randn(shape).to(dtype)
    q = quantize_nf4(w, blocksize=blocksize)
    out = q.dequantize()
    assert out.shape == shape and out.dtype == dtype
    assert q.packed.shape == (w.numel() // 2, 1)
    assert q.absmax.shape == (w.numel() // blocksize,)
    assert q.nested_absmax.shape == (-(-w.numel() // blocksize // 256),)
    # scale-relative bound: half the widest gap plus the 8-bit absmax error and dtype rounding
    assert (out.float() - w.float()).abs().max() <= 0.2 * w.float().abs().max()


def test_quantize_does_not_need_grad_or_contiguity():
    w = torch.randn(64, 128, requires_grad=True)
    q = quantize_nf4(w.t())
    assert q.shape == (128, 64)
    assert torch.equal(q.dequantize(), quantize_nf4(w.detach().t().contiguous()).dequantize())


def test_to_moves_every_tensor():
    q = quantize_nf4(torch.randn(64, 64)).to("meta")
    assert all(t.device.type == "meta" for t in (q.packed, q.absmax, q.quant_map, q.nested_absmax, q.offset))
    assert q.nested_quant_map.device.type == "meta"
    assert (q.blocksize, q.shape, q.dtype) == (64, (64, 64), torch.float32)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192, 0, -64])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=rf"blocksize={blocksize} is invalid; allowed: a power of two in 32\.\.4096"):
        quantize_nf4(torch.randn(64, 64), blocksize=blocksize)


def test_rejects_non_int_blocksize():
    with pytest.raises(ValueError, match="blocksize=64.0 is invalid"):
        quantize_nf4(torch.randn(64, 64), blocksize=64.0)


@pytest.mark.parametrize("shape", [(3, 7), (65,), (0, 64), ()])
def test_rejects_numel_not_a_positive_multiple_of_blocksize(shape):
    with pytest.raises(ValueError, match="positive multiple of blocksize=64"):
        quantize_nf4(torch.randn(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite(bad):
    w = torch.randn(64, 64)
    w[5, 7] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        quantize_nf4(w)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float64, torch.bool])
def test_rejects_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match=rf"w.dtype={dtype} is not supported; allowed: float32, bfloat16, float16"):
        quantize_nf4(torch.zeros(64, 64, dtype=dtype))


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="w must be a torch.Tensor, got list"):
        quantize_nf4([0.0] * 64)


# ---------------------------------------------------------------- state dict


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_keys_dtypes_shapes_and_json(double_quant):
    q = quantize_nf4(torch.randn(96, 64).bfloat16(), double_quant=double_quant)
    sd = q.to_bnb_state_dict(PREFIX)
    expected = SUFFIXES if double_quant else ["", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"]
    assert list(sd) == [PREFIX + s for s in expected]
    assert sd[PREFIX].dtype == torch.uint8 and sd[PREFIX].shape == (96 * 64 // 2, 1)
    assert sd[PREFIX + ".absmax"].dtype == (torch.uint8 if double_quant else torch.float32)
    assert sd[PREFIX + ".absmax"].shape == (96,)
    assert torch.equal(sd[PREFIX + ".quant_map"], NF4_CODE)
    state = json.loads(bytes(sd[PREFIX + ".quant_state.bitsandbytes__nf4"].tolist()))
    head = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [96, 64]}
    if double_quant:
        assert torch.equal(sd[PREFIX + ".nested_quant_map"], DYNAMIC_MAP)
        assert sd[PREFIX + ".nested_absmax"].shape == (1,)
        assert state == {**head, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": q.offset.item()}
    else:
        assert state == head


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_round_trip(dtype, double_quant):
    q = quantize_nf4(torch.randn(64, 96).to(dtype), blocksize=32, double_quant=double_quant)
    other = quantize_nf4(torch.randn(64, 64)).to_bnb_state_dict("model.other.weight")
    back = NF4Weight.from_bnb_state_dict({**other, **q.to_bnb_state_dict(PREFIX)}, PREFIX)
    assert (back.blocksize, back.shape, back.dtype, back.double_quant) == (32, (64, 96), dtype, double_quant)
    assert torch.equal(back.offset, q.offset) if double_quant else back.offset is None
    assert torch.equal(back.dequantize(), q.dequantize())


def test_state_dicts_of_many_weights_save_as_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = {}
    for i in range(3):
        sd.update(quantize_nf4(torch.randn(64, 64)).to_bnb_state_dict(f"layers.{i}.weight"))
    save_file(sd, tmp_path / "model.safetensors")  # fails if the weights shared their maps
    loaded = load_file(tmp_path / "model.safetensors")
    for i in range(3):
        prefix = f"layers.{i}.weight"
        expected = NF4Weight.from_bnb_state_dict(sd, prefix).dequantize()
        assert torch.equal(NF4Weight.from_bnb_state_dict(loaded, prefix).dequantize(), expected)


def corrupt(sd, key, value=None, state=None):
    """A copy of ``sd`` with ``key`` set to ``value`` (removed when None) or its JSON fields updated."""
    sd = dict(sd)
    state_key = PREFIX + ".quant_state.bitsandbytes__nf4"
    if state is not None:
        sd[state_key] = state_dict_tensor({**json.loads(bytes(sd[state_key].tolist())), **state})
    elif value is None:
        del sd[key]
    else:
        sd[key] = value
    return sd


@pytest.fixture
def good_sd():
    return quantize_nf4(torch.randn(64, 1024)).to_bnb_state_dict(PREFIX)


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda sd: corrupt(sd, PREFIX + ".quant_state.bitsandbytes__nf4"), "missing key '.*bitsandbytes__nf4'"),
        (lambda sd: corrupt(sd, PREFIX + ".absmax"), r"missing key\(s\) \['.*up_proj.weight.absmax'\]"),
        (lambda sd: corrupt(sd, PREFIX), r"missing key\(s\) \['model.layers.0.mlp.up_proj.weight'\]"),
        (lambda sd: corrupt(sd, PREFIX + ".nested_absmax"), r"missing key\(s\) \['.*nested_absmax'\]"),
        (lambda sd: corrupt(sd, PREFIX + ".quant_map"), r"missing key\(s\) \['.*quant_map'\]"),
        (lambda sd: corrupt(sd, None, state={"quant_type": "fp4"}), "quant_type='fp4'; allowed: 'nf4'"),
        (
            lambda sd: corrupt(
                sd, PREFIX + ".quant_state.bitsandbytes__nf4", torch.tensor([123, 34], dtype=torch.uint8)
            ),
            "does not hold valid UTF-8 JSON",
        ),
        (
            lambda sd: corrupt(sd, PREFIX + ".quant_state.bitsandbytes__nf4", state_dict_tensor([1, 2])),
            "must hold a JSON object, got list",
        ),
        (
            lambda sd: corrupt(sd, PREFIX + ".quant_state.bitsandbytes__nf4", torch.zeros(3, 4)),
            "must be a 1-d uint8 tensor",
        ),
        (lambda sd: corrupt(sd, None, state={"shape": [64, 512]}), "packed is torch.uint8 with 32768 elements"),
        (lambda sd: corrupt(sd, None, state={"shape": [64, "1024"]}), "'shape' is \\[64, '1024'\\]"),
        (lambda sd: corrupt(sd, None, state={"shape": None}), "field 'shape' is None; expected list"),
        (lambda sd: corrupt(sd, None, state={"blocksize": 128}), "absmax is torch.uint8 with 1024 elements"),
        (lambda sd: corrupt(sd, None, state={"blocksize": 48}), "blocksize=48 is invalid"),
        (lambda sd: corrupt(sd, None, state={"blocksize": True}), "field 'blocksize' is True; expected int"),
        (lambda sd: corrupt(sd, None, state={"dtype": "float64"}), "'dtype' is 'float64'; allowed: float32"),
        (lambda sd: corrupt(sd, None, state={"nested_blocksize": 128}), "'nested_blocksize' is 128; allowed: 256"),
        (lambda sd: corrupt(sd, None, state={"nested_dtype": "float16"}), "'nested_dtype' is 'float16'"),
        (lambda sd: corrupt(sd, None, state={"nested_offset": "x"}), "'nested_offset' is 'x'; expected int or float"),
        (lambda sd: corrupt(sd, PREFIX + ".quant_map", torch.linspace(-1, 1, 16)), "not the NF4 code table"),
        (lambda sd: corrupt(sd, PREFIX + ".nested_absmax", torch.ones(5)), "nested_absmax is torch.float32 with 5"),
        (lambda sd: corrupt(sd, PREFIX + ".absmax", torch.ones(1024)), "absmax is float32 .* nested_absmax"),
        (
            lambda sd: corrupt(sd, PREFIX + ".nested_quant_map", torch.ones(16)),
            "nested_quant_map is torch.float32 with 16",
        ),
    ],
)
def test_from_bnb_state_dict_rejects_bad_input(good_sd, make_bad, message):
    with pytest.raises(ValueError, match=message):
        NF4Weight.from_bnb_state_dict(make_bad(good_sd), PREFIX)


def test_from_bnb_state_dict_names_an_fp4_weight(good_sd):
    sd = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in good_sd.items()}
    with pytest.raises(ValueError, match=r"found .*bitsandbytes__fp4.*\(only nf4 is supported\)"):
        NF4Weight.from_bnb_state_dict(sd, PREFIX)


def test_from_bnb_state_dict_errors_name_the_weight(good_sd):
    with pytest.raises(ValueError, match=f"NF4 weight '{PREFIX}' is inconsistent"):
        NF4Weight.from_bnb_state_dict(corrupt(good_sd, None, state={"shape": [64, 512]}), PREFIX)


def test_constructor_rejects_unsupported_dtype():
    q = quantize_nf4(torch.randn(64, 64))
    with pytest.raises(ValueError, match="dtype=torch.float64 is not supported"):
        NF4Weight(**{**q.__dict__, "dtype": torch.float64})


# ---------------------------------------------------------------- bitsandbytes as oracle

ORACLE_CASES = [
    ((4096, 64), 64),
    ((512, 96), 64),  # shape[-1] not a multiple of blocksize
    ((300, 64 * 9), 64),  # 2700 blocks: last nested group partial
    ((128, 256), 32),
    ((64, 1024), 256),
    ((16, 8192), 4096),
    ((64 * 100,), 64),
]


def bnb_quantize(w, blocksize, double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_dequantize(packed, state):
    """bitsandbytes' CPU dequantize, on a flat (1, numel) view: its AVX-512 kernel indexes
    absmax per row and is wrong when shape[-1] is not a multiple of blocksize."""
    F = pytest.importorskip("bitsandbytes.functional")
    shape = state.shape
    state.shape = torch.Size((1, shape.numel()))
    try:
        return F.dequantize_4bit(packed, state).reshape(shape)
    finally:
        state.shape = shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, blocksize", ORACLE_CASES)
def test_bytes_and_values_identical_to_bitsandbytes(shape, blocksize, dtype):
    torch.manual_seed(4)
    # per-row scales over four decades so the 8-bit absmax codes use the whole dynamic map
    w = (torch.randn(shape) * torch.logspace(-3, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))).to(dtype)
    w.view(-1)[:blocksize] = 0  # one all-zero block
    packed, state = bnb_quantize(w, blocksize, double_quant=True)
    q = quantize_nf4(w, blocksize=blocksize)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    assert torch.equal(q.offset, state.offset)
    assert torch.equal(q.nested_quant_map, state.state2.code)
    assert torch.equal(q.quant_map, state.code)
    assert torch.equal(q.dequantize(), bnb_dequantize(packed, state))


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_to_bitsandbytes_without_double_quant(dtype):
    torch.manual_seed(5)
    w = torch.randn(256, 320).to(dtype)
    packed, state = bnb_quantize(w, 64, double_quant=False)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.dequantize(), bnb_dequantize(packed, state))


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_identical_to_bitsandbytes_and_loads_both_ways(double_quant):
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(6)
    w = torch.randn(192, 128).bfloat16()
    packed, state = bnb_quantize(w, 64, double_quant)
    theirs = {PREFIX: packed, **{f"{PREFIX}.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = quantize_nf4(w, double_quant=double_quant).to_bnb_state_dict(PREFIX)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key  # includes the JSON bytes

    their_state = F.QuantState.from_dict({k: v for k, v in ours.items() if k != PREFIX}, device=torch.device("cpu"))
    expected = NF4Weight.from_bnb_state_dict(theirs, PREFIX).dequantize()
    assert torch.equal(bnb_dequantize(ours[PREFIX], their_state), expected)


def test_loads_bitsandbytes_quant_storage_bfloat16():
    torch.manual_seed(7)
    w = torch.randn(64, 128)
    F = pytest.importorskip("bitsandbytes.functional")
    packed, state = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16)
    sd = {PREFIX: packed, **{f"{PREFIX}.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert sd[PREFIX].dtype == torch.bfloat16
    assert torch.equal(NF4Weight.from_bnb_state_dict(sd, PREFIX).dequantize(), quantize_nf4(w).dequantize())


def test_transformers_bnb_checkpoint_round_trip(tmp_path):
    """A real transformers + bitsandbytes 4-bit checkpoint: we read every weight, and
    quantizing the original weights ourselves writes exactly the same tensors."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    import transformers
    from safetensors.torch import load_file

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(8)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    quant_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=quant_config, device_map="cpu", dtype=torch.bfloat16
    )
    model.save_pretrained(tmp_path / "nf4")
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    saved = load_file(tmp_path / "nf4" / "model.safetensors")

    prefixes = [k.removesuffix(".quant_state.bitsandbytes__nf4") for k in saved if k.endswith("bitsandbytes__nf4")]
    assert len(prefixes) == 7  # q, k, v, o, gate, up, down
    for prefix in prefixes:
        ours = quantize_nf4(dense[prefix].bfloat16()).to_bnb_state_dict(prefix)
        assert set(ours) == {k for k in saved if k.startswith(prefix)}
        for key, tensor in ours.items():
            assert torch.equal(tensor, saved[key]), key
        module = model.get_submodule(prefix.removesuffix(".weight"))
        expected = bnb_dequantize(module.weight.data, module.weight.quant_state)
        assert torch.equal(NF4Weight.from_bnb_state_dict(saved, prefix).dequantize(), expected)
