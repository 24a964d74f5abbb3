"""NF4Weight: a frozen weight stored as bitsandbytes-compatible NF4 with double quantization.

``quantize_nf4(w)`` gives the same bytes bitsandbytes' ``quantize_4bit(w, quant_type="nf4",
compress_statistics=True)`` gives on CPU, and ``to_bnb_state_dict`` /
``from_bnb_state_dict`` read and write the keys transformers saves for a bitsandbytes
4-bit layer, so QLoRA checkpoints move between lorafx and the Hugging Face stack.
The math lives in ``lorafx.kernels.nf4`` (reference + ``lorafx::nf4_dequant`` op).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lorafx.kernels.nf4 import (
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    check_blocksize,
    check_nf4_args,
    double_quantize_absmax,
    quantize_nf4_blocks,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
TENSOR_FIELDS = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Weight:
    """The tensors of one NF4-quantized weight, laid out exactly as bitsandbytes stores them.

    ``absmax`` is uint8 codes when double-quantized (then ``nested_absmax``,
    ``nested_quant_map`` and the 0-d ``offset`` are set) or float32 otherwise (then they
    are None). ``shape`` and ``dtype`` are those of the original weight, which
    ``dequantize`` restores. Construction validates consistency, so an NF4Weight in hand
    always dequantizes.
    """

    packed: Tensor
    absmax: Tensor
    quant_map: Tensor
    nested_absmax: Tensor | None
    nested_quant_map: Tensor | None
    offset: Tensor | None
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self):
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype={self.dtype} is not supported; allowed: {', '.join(_DTYPES)}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        check_nf4_args(
            self.packed,
            self.absmax,
            self.quant_map,
            self.nested_absmax,
            self.nested_quant_map,
            self.offset,
            self.blocksize,
            self.shape,
        )

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    def _tensors(self) -> dict[str, Tensor]:
        return {f: getattr(self, f) for f in TENSOR_FIELDS if getattr(self, f) is not None}

    def dequantize(self) -> Tensor:
        """The weight in its original shape and dtype (through the ``lorafx::nf4_dequant`` op)."""
        return torch.ops.lorafx.nf4_dequant(
            self.packed,
            self.absmax,
            self.quant_map,
            self.nested_absmax,
            self.nested_quant_map,
            self.offset,
            self.blocksize,
            list(self.shape),
            self.dtype,
        )

    def nbytes(self) -> int:
        """Bytes of every tensor held (codes, scales, both maps, offset): the real storage cost."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, **{field: t.to(device) for field, t in self._tensors().items()})

    def to_bnb_state_dict(self, prefix: str) -> dict[str, Tensor]:
        """The entries transformers writes for a bitsandbytes 4-bit weight named ``prefix``.

        ``prefix`` is the weight's full key, e.g. ``"model.layers.0.mlp.up_proj.weight"``.
        The non-tensor state goes, as in bitsandbytes, into
        ``<prefix>.quant_state.bitsandbytes__nf4``: the UTF-8 bytes of ``json.dumps`` of
        quant_type, blocksize, dtype, shape (and nested_* with double quantization), in
        bitsandbytes' key order so the bytes are identical to theirs.
        """
        state = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        sd = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map}
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_quant_map
        sd[f"{prefix}.{_QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: Mapping[str, Tensor], prefix: str) -> NF4Weight:
        """Read the weight named ``prefix`` from a bitsandbytes/transformers 4-bit state dict.

        ``sd`` may hold a whole model; only ``prefix`` and its quant-state keys are read.
        Raises ValueError naming the key and the problem when a key is missing, the JSON
        is unreadable, the quant type is not nf4, or sizes disagree with shape/blocksize.
        """
        state_key = f"{prefix}.{_QUANT_STATE_KEY}"
        if state_key not in sd:
            other = [k for k in sd if k.startswith(f"{prefix}.quant_state.")]
            found = f"; found {other} (only nf4 is supported)" if other else ""
            raise ValueError(f"missing key '{state_key}'{found}")
        state = _parse_quant_state(sd[state_key], state_key)
        double_quant = "nested_offset" in state
        names = ["", ".absmax", ".quant_map"] + ([".nested_absmax", ".nested_quant_map"] if double_quant else [])
        missing = [f"{prefix}{name}" for name in names if f"{prefix}{name}" not in sd]
        if missing:
            raise ValueError(f"missing key(s) {missing} for the NF4 weight '{prefix}'")
        quant_map = sd[f"{prefix}.quant_map"]
        if quant_map.shape != NF4_CODE.shape or not torch.equal(quant_map.cpu(), NF4_CODE):
            raise ValueError(f"'{prefix}.quant_map' is not the NF4 code table although quant_type is nf4")
        packed = sd[prefix]
        if packed.dtype != torch.uint8:
            # bitsandbytes' quant_storage option (used with FSDP) keeps the same bytes
            # under a wider dtype; the byte order is unchanged.
            packed = packed.contiguous().view(torch.uint8).reshape(-1, 1)
        absmax = sd[f"{prefix}.absmax"]
        # A NaN/Inf scale or code dequantizes its whole block (or all blocks) to NaN/Inf.
        for name in names[1:]:
            tensor = sd[f"{prefix}{name}"]
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"NF4 weight '{prefix}': '{prefix}{name}' holds NaN/Inf; the quant state must be finite")
        try:
            return cls(
                packed=packed,
                absmax=absmax,
                quant_map=quant_map,
                nested_absmax=sd[f"{prefix}.nested_absmax"] if double_quant else None,
                nested_quant_map=sd[f"{prefix}.nested_quant_map"] if double_quant else None,
                offset=torch.tensor(state["nested_offset"], dtype=torch.float32, device=absmax.device)
                if double_quant
                else None,
                blocksize=state["blocksize"],
                shape=tuple(state["shape"]),
                dtype=_DTYPES[state["dtype"]],
            )
        except ValueError as e:
            raise ValueError(f"NF4 weight '{prefix}' is inconsistent with '{state_key}': {e}") from e


def _parse_quant_state(tensor: Tensor, key: str) -> dict:
    """Decode and check the JSON bitsandbytes packs into a uint8 tensor."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"'{key}' must be a 1-d uint8 tensor of JSON bytes, got {tensor.dtype} {tuple(tensor.shape)}")
    try:
        state = json.loads(bytes(tensor.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"'{key}' does not hold valid UTF-8 JSON: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"'{key}' must hold a JSON object, got {type(state).__name__}")
    if state.get("quant_type") != "nf4":
        raise ValueError(f"'{key}' has quant_type={state.get('quant_type')!r}; allowed: 'nf4'")
    required = {"blocksize": int, "dtype": str, "shape": list}
    if "nested_offset" in state:
        required.update(nested_blocksize=int, nested_dtype=str, nested_offset=(int, float))
    for field, kind in required.items():
        if not isinstance(state.get(field), kind) or isinstance(state.get(field), bool):
            raise ValueError(f"'{key}' field {field!r} is {state.get(field)!r}; expected {_kind_name(kind)}")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in state["shape"]):
        raise ValueError(f"'{key}' field 'shape' is {state['shape']!r}; expected a list of ints")
    if state["dtype"] not in _DTYPES:
        raise ValueError(f"'{key}' field 'dtype' is {state['dtype']!r}; allowed: {', '.join(_DTYPES)}")
    if "nested_offset" in state:
        if not math.isfinite(state["nested_offset"]):
            raise ValueError(f"'{key}' field 'nested_offset' is {state['nested_offset']!r}; expected a finite number")
        if state["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise ValueError(
                f"'{key}' field 'nested_blocksize' is {state['nested_blocksize']}; allowed: {NESTED_BLOCKSIZE}"
            )
        if state["nested_dtype"] != "float32":
            raise ValueError(f"'{key}' field 'nested_dtype' is {state['nested_dtype']!r}; allowed: 'float32'")
    return state


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a floating weight to NF4, bit-identical to bitsandbytes on CPU.

    Blocks of ``blocksize`` run over the flattened row-major weight, so ``w.numel()``
    must be a multiple of ``blocksize`` (true of every linear layer in common LLMs).
    With ``double_quant`` (bitsandbytes' ``compress_statistics``) the per-block scales
    are themselves 8-bit quantized: about 4.127 bits per parameter instead of 4.5.
    NaN/Inf are rejected because one would poison its whole block's scale.
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _DTYPE_NAMES:
        raise TypeError(f"w.dtype={w.dtype} is not supported; allowed: {', '.join(_DTYPES)}")
    check_blocksize(blocksize)
    if w.numel() == 0 or w.numel() % blocksize:
        raise ValueError(
            f"w has {w.numel()} elements (shape {list(w.shape)}); NF4 needs a positive multiple of "
            f"blocksize={blocksize}"
        )
    packed, absmax = quantize_nf4_blocks(w, blocksize)
    # A NaN or Inf makes its block's absmax NaN or Inf, so checking the (numel / blocksize)
    # scales finds them without another pass over the weight.
    if not torch.isfinite(absmax).all():
        nonfinite = int((~torch.isfinite(w)).sum())
        raise ValueError(f"w contains {nonfinite} NaN/Inf value(s); NF4 can only quantize finite weights")
    nested_absmax = nested_quant_map = offset = None
    if double_quant:
        absmax, nested_absmax, offset = double_quantize_absmax(absmax)
        nested_quant_map = DYNAMIC_MAP.to(w.device, copy=True)
    # Each weight owns its maps (copy=True): safetensors refuses to save tensors that
    # share storage, and a transformers checkpoint stores one pair of maps per weight.
    return NF4Weight(
        packed=packed,
        absmax=absmax,
        quant_map=NF4_CODE.to(w.device, copy=True),
        nested_absmax=nested_absmax,
        nested_quant_map=nested_quant_map,
        offset=offset,
        blocksize=blocksize,
        shape=tuple(w.shape),
        dtype=w.dtype,
    )
