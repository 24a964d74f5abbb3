"""Memory and FLOP cost model for full fine-tuning, LoRA and QLoRA, written in sympy.

Each cost is one symbolic expression in the model's dims (from graph capture or a Llama
preset), the LoRA rank, batch, sequence length and byte sizes, so `lorafx inspect` and
`lorafx estimate` can print the formula next to its value, and tests can check the formulas
against the published figures (16 bytes/param for AdamW mixed precision, a 65B QLoRA
fine-tune within 48 GB, 0.06% trainable for a 7B Llama at r=8 on q_proj/v_proj).

Symbols (all counts, memory in bytes):
    P  parameters of the base model        Q  of them, linear weights stored as NF4 (QLoRA)
    F = P − Q  the rest (embeddings, norms, output head), kept in 16/32 bits under QLoRA
    M  Σ in·out over all linear layers      S  Σ (in + out) over the LoRA-targeted layers
    N = r·S  LoRA parameters (trainable)    r  LoRA rank
    b  batch  s  sequence  L  layers  d  hidden size  V  vocabulary

Accounting, per trainable parameter (the same for full fine-tuning and LoRA): its weight
(bf16/fp16 working copy 2 + fp32 master 4, or fp32 4), its gradient (2 or 4) and AdamW's
two fp32 moments (8) — 16 bytes either way. Frozen parameters cost their storage only: 2 or
4 bytes, or for NF4 1/2 + 1/64 (uint8 absmax per 64-block) + 4/(64·256) (fp32 absmax of the
absmax per 256 blocks) = 0.5159 bytes. Activations follow Korthikanti et al. (2022),
"Reducing Activation Recomputation": 34·s·b·d bytes per layer at 2-byte activations
(17·β·b·s·d at β bytes), without their 5·a·s²·b attention-score term, which fused attention
(SDPA, FlashAttention: the default in transformers on CPU and GPU) does not store; plus the
logits and their fp32 log-softmax. With gradient checkpointing only each layer's input
(β·b·s·d) is kept and one layer is recomputed at a time. The parts are added up, as the
usual calculators do; with `zero_grad(set_to_none=True)` gradients and activations peak at
different moments, so the total is an upper bound (the CPU test measures how close).
FLOPs count matmuls: 2 per multiply-add in the forward pass, twice that backward, but a
frozen weight needs no weight gradient, so LoRA and QLoRA skip a third of the linear work.
"""

from __future__ import annotations

import dataclasses
import re

import sympy
import torch

from lorafx.passes import match_linears
from lorafx.passes.common import LINEAR

from lorafx.core.capture import capture
from lorafx.core.spec import LoraSpec

P, Q, F, M, S, N, r, b, s, L, d, V = sympy.symbols("P Q F M S N r b s L d V", positive=True)

OPTIMIZER_BYTES = 8  # AdamW: exp_avg and exp_avg_sq, fp32
NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization groups 256 absmax values


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes per value: frozen weights and activations (`value`), trainable weight, gradient."""

    name: str
    value: int
    trainable_weight: int
    gradient: int


PRECISIONS = {
    # Mixed precision keeps an fp32 master copy next to the 16-bit working weights.
    "bf16": Precision("bf16 mixed precision", 2, 2 + 4, 2),
    "fp16": Precision("fp16 mixed precision", 2, 2 + 4, 2),
    "fp32": Precision("fp32", 4, 4, 4),
}

METHODS = ("full", "lora", "qlora")
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (NF4)"}
PARTS = ("weights", "gradients", "optimizer", "activations")

# Published Llama shapes (Touvron et al. 2023; Llama 2 70B and Llama 3 8B use grouped-query
# attention), as transformers.LlamaConfig keyword arguments.
PRESETS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000),
    "llama-33b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52, vocab_size=32000),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}


def nf4_bytes_per_weight(blocksize: int = 64, double_quant: bool = True) -> sympy.Rational:
    """4 bits per weight plus its share of the block scales (exact, as a fraction)."""
    if double_quant:
        return sympy.Rational(1, 2) + sympy.Rational(1, blocksize) + sympy.Rational(4, blocksize * NESTED_BLOCKSIZE)
    return sympy.Rational(1, 2) + sympy.Rational(4, blocksize)


@dataclasses.dataclass(frozen=True)
class Linear:
    path: str
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """What the cost model needs to know about a model: every linear layer and a few sizes."""

    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    linears: tuple[Linear, ...]
    output_head: str | None

    @classmethod
    def from_model(cls, model: torch.nn.Module, name: str | None = None) -> "ModelDims":
        """Dims of a Hugging Face model read off its captured graph (meta parameters are fine)."""
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"{type(model).__name__} has no .config: the cost model needs a Hugging Face model")
        device = next(model.parameters()).device
        # A fixed (2, 8) example with Dim.AUTO dims: shapes are all we need, and it also
        # captures models whose position embeddings bound the sequence length (BERT).
        ids = torch.zeros(2, 8, dtype=torch.long, device=device)
        captured = capture(model, example_kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        match_linears(captured.graph_module)
        sites = {n.meta[LINEAR].path: n.meta[LINEAR] for n in captured.graph_module.graph.nodes if LINEAR in n.meta}
        return cls(
            name=name or type(model).__name__,
            params=sum(p.numel() for p in model.parameters()),
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            vocab=config.vocab_size,
            linears=tuple(Linear(site.path, site.in_features, site.out_features) for site in sites.values()),
            output_head=captured.output_head,
        )

    @classmethod
    def llama(cls, name: str, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
              num_attention_heads: int, num_key_value_heads: int, vocab_size: int) -> "ModelDims":
        """A Llama's dims from its config numbers, as transformers lays it out (untied head)."""
        kv = hidden_size // num_attention_heads * num_key_value_heads
        per_layer = [("self_attn.q_proj", hidden_size, hidden_size), ("self_attn.k_proj", hidden_size, kv),
                     ("self_attn.v_proj", hidden_size, kv), ("self_attn.o_proj", hidden_size, hidden_size),
                     ("mlp.gate_proj", hidden_size, intermediate_size), ("mlp.up_proj", hidden_size, intermediate_size),
                     ("mlp.down_proj", intermediate_size, hidden_size)]
        linears = [Linear(f"model.layers.{i}.{p}", n_in, n_out)
                   for i in range(num_hidden_layers) for p, n_in, n_out in per_layer]
        linears.append(Linear("lm_head", hidden_size, vocab_size))
        norms = (2 * num_hidden_layers + 1) * hidden_size
        params = sum(x.in_features * x.out_features for x in linears) + vocab_size * hidden_size + norms
        return cls(name, params, num_hidden_layers, hidden_size, num_attention_heads, vocab_size,
                   tuple(linears), "lm_head")

    @classmethod
    def preset(cls, name: str) -> "ModelDims":
        if name not in PRESETS:
            raise ValueError(f"unknown model config {name!r}: known are {', '.join(PRESETS)}")
        return cls.llama(name, **PRESETS[name])

    @classmethod
    def llama_with_params(cls, params: float) -> "ModelDims":
        """The Llama-shaped model nearest `params` parameters.

        Published Llamas keep about 128 hidden units per layer (d ≈ 128·L), 128-wide heads,
        an 8/3·d SwiGLU MLP and a 32000-token vocabulary: sympy solves 12·L·d² + 2·V·d = P
        for L under that shape, and d and the MLP width are rounded to multiples of 128/256.
        """
        if not params >= 1e6:
            raise ValueError(f"--params {params:g} is too small: the Llama shape rule needs at least 1e6")
        layers = sympy.nsolve(12 * L * (128 * L) ** 2 + 2 * 32000 * 128 * L - params, L, 20)
        layers = max(1, round(float(layers)))
        hidden = 128 * layers
        intermediate = 256 * round(8 * hidden / 3 / 256)
        return cls.llama(f"Llama-shaped model nearest {params:.3g} parameters", hidden, intermediate, layers, hidden // 128, hidden // 128, 32000)

    def layer_groups(self) -> list[tuple[str, int, Linear]]:
        """(path pattern with layer numbers as *, count, first layer) in graph order: the
        32 q_proj of a 7B Llama are one row `model.layers.*.self_attn.q_proj`."""
        groups: dict[tuple[str, int, int], list[Linear]] = {}
        for x in self.linears:
            groups.setdefault((re.sub(r"\.\d+(?=\.|$)", ".*", x.path), x.in_features, x.out_features), []).append(x)
        return [(pattern, len(members), members[0]) for (pattern, _, _), members in groups.items()]


@dataclasses.dataclass(frozen=True)
class Setup:
    """One training run: what is adapted, on what batch, at what precision."""

    spec: LoraSpec
    batch: int = 1
    seq: int = 2048
    precision: str = "bf16"
    checkpointing: bool = True

    def __post_init__(self):
        for field in ("batch", "seq"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Setup.{field}={value!r} is invalid: allowed is an integer >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Setup.precision={self.precision!r} is invalid: allowed is {', '.join(PRECISIONS)}")


def memory_formulas(precision: Precision, nf4_bytes, checkpointing: bool) -> dict[str, dict[str, sympy.Expr]]:
    """Bytes per method and part, in the module's symbols (byte sizes already substituted)."""
    beta, weight, grad = precision.value, precision.trainable_weight, precision.gradient
    per_layer = 17 * beta * b * s * d
    logits = b * s * V * (beta + 4)
    kept = L * beta * b * s * d + per_layer if checkpointing else L * per_layer
    activations = kept + logits
    return {
        "full": {"weights": weight * P, "gradients": grad * P, "optimizer": OPTIMIZER_BYTES * P,
                 "activations": activations},
        "lora": {"weights": beta * P + weight * N, "gradients": grad * N, "optimizer": OPTIMIZER_BYTES * N,
                 "activations": activations},
        "qlora": {"weights": nf4_bytes * Q + beta * F + weight * N, "gradients": grad * N,
                  "optimizer": OPTIMIZER_BYTES * N, "activations": activations},
    }


def flop_formulas() -> dict[str, sympy.Expr]:
    """Matmul FLOPs per step: linear layers (2·M per token forward, 4·M backward) and
    attention scores and mixing (4·b·s²·d per layer forward, twice that backward)."""
    attention = 12 * L * b * s**2 * d
    tokens = b * s
    frozen = 4 * M * tokens + 6 * N * tokens + attention  # backward: input grads only for W
    return {"full": 6 * M * tokens + attention, "lora": frozen, "qlora": frozen}


@dataclasses.dataclass
class Estimate:
    """The formulas of one model and setup, and the values that make them numbers."""

    dims: ModelDims
    setup: Setup
    values: dict[sympy.Symbol, int]
    memory: dict[str, dict[str, sympy.Expr]]
    flops: dict[str, sympy.Expr]

    def bytes(self, method: str, part: str | None = None) -> int:
        parts = [part] if part else PARTS
        return int(sum(self.memory[method][p] for p in parts).subs(self.values))

    def flops_per_step(self, method: str) -> int:
        return int(self.flops[method].subs(self.values))

    @property
    def trainable(self) -> int:
        return self.values[N]

    def trainable_fraction(self) -> float:
        """LoRA parameters over all parameters with them, as PEFT's print_trainable_parameters."""
        return self.values[N] / (self.values[P] + self.values[N])


def estimate(dims: ModelDims, setup: Setup) -> Estimate:
    """Resolve the spec against the model's layers, then bind every symbol."""
    spec = setup.spec.resolved(dims.output_head)
    qlora = dataclasses.replace(spec, quantize="nf4")  # which weights QLoRA would store as NF4
    targeted = [x for x in dims.linears if spec.selects(x.path)]
    if not targeted:
        raise ValueError(f"LoraSpec.targets={spec.targets!r} matches no linear layer of {dims.name}")
    sum_in_out = sum(x.in_features + x.out_features for x in targeted)
    quantized = sum(x.in_features * x.out_features for x in dims.linears if qlora.quantizes(x.path))
    values = {
        P: dims.params,
        Q: quantized,
        F: dims.params - quantized,
        M: sum(x.in_features * x.out_features for x in dims.linears),
        S: sum_in_out,
        N: spec.r * sum_in_out,
        r: spec.r,
        b: setup.batch,
        s: setup.seq,
        L: dims.layers,
        d: dims.hidden,
        V: dims.vocab,
    }
    precision = PRECISIONS[setup.precision]
    nf4 = nf4_bytes_per_weight(spec.blocksize, spec.double_quant)
    return Estimate(dims, setup, values, memory_formulas(precision, nf4, setup.checkpointing), flop_formulas())


def show(expr: sympy.Expr) -> str:
    """The formula with fractions as 4-digit decimals: 0.5159*Q reads better than 2113*Q/4096."""
    return sympy.sstr(expr.xreplace({x: sympy.Float(x, 4) for x in expr.atoms(sympy.Rational) if not x.is_Integer}))
