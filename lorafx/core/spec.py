"""LoraSpec: what to adapt and how, validated when it is built.

Field names follow the LoRA paper; their PEFT twins are noted so a PEFT user can map a
LoraConfig one to one (see `LoraSpec.from_peft_config`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Sequence

import torch

from lorafx.formats.adapters import ALPHA_LIMIT, check_config, read_config

INITS = ("kaiming", "gaussian", "pissa", "loftq")  # and "pissa_niter_<N>"
PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")
QUANTIZE = (None, "nf4")
COMPUTE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
# dtype names accepted where a dtype may be given as a string (as transformers' torch_dtype).
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CHECKPOINT = (None, "layer")
BIASES = ("none",)
ALL_LINEAR = "all-linear"
# PEFT's modules_to_save default per task model (PeftModelFor*): the new head, trained in full.
TASK_HEADS = {
    "ForSequenceClassification": ("classifier", "score", "pre_classifier"),
    "ForTokenClassification": ("classifier", "score", "pre_classifier"),
    "ForQuestionAnswering": ("qa_outputs",),
}


def _fail(field: str, value, allowed: str):
    raise ValueError(f"LoraSpec.{field}={value!r} is invalid: allowed is {allowed}")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters: h = W0·x + scale·B·A·x with scale = alpha/r (alpha/√r with rsLoRA).

    targets: "all-linear" (every linear layer except `exclude`), a list of module-name
        suffixes like PEFT's `target_modules` (["q_proj", "v_proj"]), or a regex string
        matched against the full module path (PEFT's regex form, `re.fullmatch`).
    exclude: same forms as `targets`; None means PEFT's default: the output head when
        targets is "all-linear", nothing otherwise.
    layers: PEFT's layers_to_transform: only layers with these indices (an int or a list of
        ints >= 0) are adapted; the index is the first number in the module path (the first
        one after `layers_pattern`, e.g. "layers" or "h", when that is given, a regex or a
        list of them). As in PEFT it filters suffix targets (and "all-linear", which PEFT
        writes out as suffixes), not a full path named in targets, and no regex targets.
    use_dora: DoRA (weight-decomposed LoRA): a trainable magnitude per output row rescales
        W0 + scale·B·A, as PEFT's use_dora.
    init: "kaiming" (PEFT default: A kaiming-uniform, B zero) or "gaussian" (A ~ N(0, 1/r)):
        the layer starts unchanged. "pissa": A, B are the top-r singular directions of W and
        the base keeps the residual W - scale·B·A (PEFT's "pissa"; with quantize="nf4" the
        residual is quantized: QPiSSA); "pissa_niter_N": the same from a randomized SVD with N
        subspace iterations. "loftq" (needs quantize="nf4"): base and B·A alternately fitted
        so NF4(base) + scale·B·A ≈ W, `loftq_iter` rounds (PEFT's LoftQConfig.loftq_iter,
        ignored by other inits). These three rewrite the base weights, so they need the
        full-precision model (lorafx.transform, not a streaming from_pretrained with NF4).

    QLoRA: quantize="nf4" stores every frozen linear weight except `quantize_skip` as NF4
    (bitsandbytes' layout; `blocksize`, `double_quant` as its blocksize/compress_statistics).
    quantize_skip: selector form; None means the output head, as bitsandbytes skips it.
    compute_dtype: dtype the NF4 weights dequantize to and the linear runs in; None means
        bfloat16 on CUDA and the weight's own dtype elsewhere. LoRA weights use it too.
    autocast_adapter_dtype: LoRA weights in float32 on float16/bfloat16 layers, the branch
        computed in float32 and added back in the layer's dtype, as PEFT's get_peft_model
        default (autocast_adapter_dtype=True); False keeps them in the layer's dtype. DoRA and
        NF4 layers keep the compute dtype either way.
    checkpoint: "layer" recomputes each decoder layer in the backward (activation checkpointing).
    chunked_loss: a causal LM's training call with labels runs the output head and the
        cross-entropy a chunk of tokens at a time and returns the loss without logits
        (lorafx/kernels/linear_cross_entropy.py); False always computes the full logits.
        A call can also ask for them: `lm(..., labels=..., return_logits=True)`.
    modules_to_save: modules trained in full (not LoRA, not NF4) and saved in the adapter, as
        PEFT's `modules_to_save` (list of module-name suffixes, or a regex). None means PEFT's
        task default: the new head of a sequence/token classifier ("classifier", "score",
        "pre_classifier", PEFT 0.22's list) or
        of question answering ("qa_outputs"); nothing for other models.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str | Sequence[str] = ALL_LINEAR
    exclude: str | Sequence[str] | None = None
    layers: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    quantize: str | None = None
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    quantize_skip: str | Sequence[str] | None = None
    checkpoint: str | None = None
    loftq_iter: int = 1
    modules_to_save: str | Sequence[str] | None = None
    autocast_adapter_dtype: bool = True
    chunked_loss: bool = True

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            _fail("r", self.r, "an integer >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and abs(self.alpha) <= ALPHA_LIMIT
        ):
            # 0 and negative alphas are PEFT's too (scale 0 or negative); beyond float32 the scale is inf.
            _fail("alpha", self.alpha, f"a finite number with |alpha| <= {ALPHA_LIMIT:.7g} (float32's largest)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0 <= self.dropout < 1
        ):
            _fail("dropout", self.dropout, "a number with 0 <= dropout < 1")
        object.__setattr__(self, "targets", _check_selector("targets", self.targets))
        if self.exclude is not None:
            object.__setattr__(self, "exclude", _check_selector("exclude", self.exclude))
        self._check_layers()
        if not isinstance(self.use_rslora, bool):
            _fail("use_rslora", self.use_rslora, "True or False")
        if not isinstance(self.autocast_adapter_dtype, bool):
            _fail("autocast_adapter_dtype", self.autocast_adapter_dtype, "True or False")
        if not isinstance(self.chunked_loss, bool):
            _fail("chunked_loss", self.chunked_loss, "True or False")
        if not isinstance(self.use_dora, bool):
            _fail("use_dora", self.use_dora, "True or False")
        if self.init not in INITS and not (isinstance(self.init, str) and PISSA_NITER.fullmatch(self.init)):
            _fail("init", self.init, "'kaiming', 'gaussian', 'pissa', 'pissa_niter_N' (N an integer >= 1) or 'loftq'")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            _fail("loftq_iter", self.loftq_iter, "an integer >= 1")
        if self.bias not in BIASES:
            _fail("bias", self.bias, "'none' (LoRA bias training is not supported)")
        if self.quantize not in QUANTIZE:
            _fail("quantize", self.quantize, "None or 'nf4'")
        if (
            isinstance(self.blocksize, bool)
            or not isinstance(self.blocksize, int)
            or not 32 <= self.blocksize <= 4096
            or self.blocksize & (self.blocksize - 1)
        ):
            _fail("blocksize", self.blocksize, "a power of two from 32 to 4096")
        if not isinstance(self.double_quant, bool):
            _fail("double_quant", self.double_quant, "True or False")
        if self.compute_dtype not in COMPUTE_DTYPES:
            _fail("compute_dtype", self.compute_dtype, "None, torch.float32, torch.bfloat16 or torch.float16")
        if self.quantize_skip is not None:
            object.__setattr__(self, "quantize_skip", _check_selector("quantize_skip", self.quantize_skip))
        if self.modules_to_save is not None:
            if self.modules_to_save == ALL_LINEAR:
                _fail("modules_to_save", self.modules_to_save, "module-name suffixes or a regex, not 'all-linear'")
            object.__setattr__(self, "modules_to_save", _check_selector("modules_to_save", self.modules_to_save))
        if self.checkpoint not in CHECKPOINT:
            _fail("checkpoint", self.checkpoint, "None or 'layer'")
        if self.init == "loftq" and self.quantize != "nf4":
            allowed = f"'loftq' only with quantize='nf4' (LoftQ fits B·A to the NF4 error), not quantize={self.quantize!r}"
            _fail("init", self.init, allowed)
        if self.init_from_weights and self.alpha <= 0:
            # PiSSA and LoftQ share W's singular values between A and B as sqrt(S / scale).
            _fail("alpha", self.alpha, f"a number > 0 with init={self.init!r} (it splits W as sqrt(S / scale))")

    def _check_layers(self):
        layers, pattern = self.layers, self.layers_pattern
        if isinstance(layers, (list, tuple)) and all(_is_layer_index(v) for v in layers):
            layers = tuple(sorted(set(layers))) or None  # PEFT: an empty list adapts every layer
        elif not (layers is None or _is_layer_index(layers)):
            _fail("layers", layers, "None, an integer >= 0 or a list of them (layer indices)")
        if layers is not None and isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            _fail("layers", self.layers, f"None with a regex targets={self.targets!r} (as PEFT: put the index in the regex)")
        if isinstance(pattern, str):
            pattern = (pattern,) if pattern else None
        elif isinstance(pattern, (list, tuple)) and all(isinstance(v, str) and v for v in pattern):
            pattern = tuple(pattern) or None
        elif pattern is not None:
            _fail("layers_pattern", pattern, "None, a regex or a list of regexes naming the layer list (e.g. 'layers')")
        for regex in pattern or ():
            try:
                re.compile(regex)
            except re.error as e:
                _fail("layers_pattern", self.layers_pattern, f"valid regexes ({e})")
        if pattern is not None and layers is None:
            _fail("layers_pattern", self.layers_pattern, "None unless layers is given (it says where layers counts)")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "layers_pattern", pattern)

    def in_layers(self, path: str) -> bool:
        """PEFT's layers_to_transform filter (check_target_module_exists): is `path` in one of
        spec.layers? A path named in full in targets is in, as PEFT's exact-key match skips the
        filter (with all-linear, which PEFT expands to suffix names, a top-level linear's)."""
        if self.layers is None or (path in self.targets if isinstance(self.targets, tuple) else "." not in path):
            return True
        # The first index, not a nested one (".layers.1.experts.0."): PEFT's lazy match.
        regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in self.layers_pattern] if self.layers_pattern else [
            r".*?\.[^.]*\.(?P<idx>\d+)\."
        ]
        for regex in regexes:
            match = re.match(regex, path)
            if match:
                return int(match["idx"]) in (self.layers if isinstance(self.layers, tuple) else (self.layers,))
        return False

    @property
    def init_from_weights(self) -> bool:
        """True when the init computes A, B from the base weights and rewrites them (PiSSA, LoftQ)."""
        return self.init not in ("kaiming", "gaussian")

    @property
    def peft_init_lora_weights(self) -> bool | str:
        """LoraConfig.init_lora_weights for this init (PEFT's True is our "kaiming")."""
        return True if self.init == "kaiming" else self.init

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def selects(self, path: str) -> bool:
        """True when the module at `path` is a target and not excluded (nor trained in full)."""
        return (
            _matches(self.targets, path)
            and self.in_layers(path)
            and not (self.exclude and _matches(self.exclude, path))
            and not self.saves(path)
        )

    def quantizes(self, path: str) -> bool:
        """True when the frozen weight of the linear layer at `path` is stored as NF4."""
        return (
            self.quantize == "nf4"
            and not (self.quantize_skip and _matches(self.quantize_skip, path))
            and not self.saves(path)
        )

    def saves(self, path: str) -> bool:
        """True when the module at `path` is in modules_to_save (or inside one): trained in full and saved."""
        if not self.modules_to_save:
            return False
        parts = path.split(".")
        return any(_matches(self.modules_to_save, ".".join(parts[:i])) for i in range(len(parts), 0, -1))

    def resolved(self, output_head: str | None, model_class: str = "") -> "LoraSpec":
        """The spec with PEFT's / bitsandbytes' defaults filled in for a model of class
        `model_class` whose output head is at `output_head`: all-linear excludes the head from
        LoRA, NF4 keeps it full precision, a task model's new head is in modules_to_save."""
        head = [output_head] if output_head else []
        exclude = self.exclude if self.exclude is not None else (head if self.targets == ALL_LINEAR else [])
        skip = self.quantize_skip if self.quantize_skip is not None else head
        saved = self.modules_to_save
        if saved is None:
            saved = next((heads for suffix, heads in TASK_HEADS.items() if model_class.endswith(suffix)), ())
        return dataclasses.replace(self, exclude=exclude, quantize_skip=skip, modules_to_save=saved)

    @classmethod
    def from_peft_config(cls, config) -> "LoraSpec":
        """A spec equal to a PEFT LoraConfig (the object, a dict, an adapter_config.json's folder)."""
        if hasattr(config, "to_dict") and hasattr(config, "peft_type"):  # a peft.PeftConfig
            config = check_config(config.to_dict(), type(config).__name__)
        elif isinstance(config, dict):
            config = check_config(config, "config")
        elif isinstance(config, (str, os.PathLike)):
            config = read_config(config)
        else:
            raise TypeError(
                f"from_peft_config takes a peft.LoraConfig, a dict or an adapter folder, got {type(config).__name__}"
            )
        init = config.get("init_lora_weights", True)
        # PEFT's False (B random too, "for debugging"), EVA, orthogonal, MiCA and NoRA have no lorafx
        # twin; they keep the base weights and only pick B·A's starting values, which a loaded
        # adapter replaces, so they map to the default init like True. (check_config has
        # refused the inits lorafx cannot reproduce, and LoftQ other than 4-bit.)
        init = "kaiming" if isinstance(init, bool) or init in ("eva", "orthogonal", "mica", "nora") else init
        loftq = config.get("loftq_config") or {}
        return cls(
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            targets=config["target_modules"],  # LoraSpec checks the type and sorts a list
            exclude=config.get("exclude_modules") or [],
            layers=config.get("layers_to_transform"),
            layers_pattern=config.get("layers_pattern"),
            use_rslora=config.get("use_rslora", False),
            use_dora=config.get("use_dora", False),
            init=init,
            loftq_iter=loftq.get("loftq_iter", 1) if init == "loftq" else 1,
            quantize="nf4" if init == "loftq" else None,  # PEFT's LoftQ is QLoRA: its base is 4-bit
            bias=config.get("bias", "none"),
            modules_to_save=config.get("modules_to_save"),
        )


def dtype_named(value, field: str = "dtype") -> torch.dtype:
    """A torch floating dtype given as itself or by name ("bfloat16", "torch.float16")."""
    if isinstance(value, str):
        value = DTYPE_NAMES.get(value.removeprefix("torch."), value)
    if value not in DTYPE_NAMES.values():
        allowed = ", ".join(f"{name!r}" for name in DTYPE_NAMES)
        raise ValueError(f"{field}={value!r} is invalid: allowed is a torch floating dtype or one of {allowed}")
    return value


def _is_layer_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_selector(field: str, value):
    """Targets/exclude: "all-linear", a regex string, or a non-empty list of name suffixes."""
    if isinstance(value, str):
        if value == ALL_LINEAR:
            return value
        if not value:
            _fail(field, value, f"{ALL_LINEAR!r}, a regex, or a list of module-name suffixes")
        try:
            re.compile(value)
        except re.error as e:
            _fail(field, value, f"a valid regex ({e})")
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(
        isinstance(v, str) and v for v in value
    ):
        if field == "targets" and not value:
            _fail(field, value, "a non-empty list of module-name suffixes")
        return tuple(sorted(value))
    return _fail(field, value, f"{ALL_LINEAR!r}, a regex string, or a list of non-empty strings")


def _matches(selector, path: str) -> bool:
    if selector == ALL_LINEAR:
        return True
    if isinstance(selector, str):
        return re.fullmatch(selector, path) is not None
    return any(path == s or path.endswith("." + s) for s in selector)


def check_selector(field: str, value, owner: str):
    """_check_selector, its message naming the spec class `owner` ("IA3Spec", "VeraSpec")."""
    try:
        return _check_selector(field, value)
    except ValueError as e:
        raise ValueError(str(e).replace("LoraSpec.", f"{owner}.", 1)) from None


class TargetSelection:
    """targets / exclude as LoraSpec reads them, for the other adapter types' specs."""

    def selects(self, path: str) -> bool:
        """True when the module at `path` is a target and not excluded."""
        return _matches(self.targets, path) and not (self.exclude and _matches(self.exclude, path))

    def resolved(self, output_head: str | None, model_class: str = ""):
        """The spec with PEFT's default filled in: "all-linear" leaves out the output head."""
        head = [output_head] if output_head else []
        exclude = self.exclude if self.exclude is not None else (head if self.targets == ALL_LINEAR else [])
        return dataclasses.replace(self, exclude=exclude)
