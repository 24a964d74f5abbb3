"""Adapters in exactly Hugging Face PEFT's on-disk format.

adapter_model.safetensors holds `base_model.model.<module path>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r); adapter_config.json holds the LoraConfig fields PEFT writes.
Only safetensors are read: pickled adapter_model.bin files are refused.
"""

from __future__ import annotations

import json
import math
import os
import re

import safetensors
import safetensors.torch
import torch

from .files import check_folder_path, locked_folder, write_atomically, write_text

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."

TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",  # GPT2LMHeadModel and its kin: causal LMs under their older class name
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


class AdapterError(ValueError):
    """An adapter folder that does not fit the model: the message names the first problem."""


# lora_alpha (and so the scale alpha/r) must be a float32 number: the LoRA weights and the
# adapter banks hold it in float32, where a larger value is inf and scale·B·A·x becomes NaN.
ALPHA_LIMIT = torch.finfo(torch.float32).max
# init_lora_weights values whose adapter sits on the base weights as they are; every other
# init (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ, ...) trained on a base it rewrote.
KEEPS_BASE = (True, False, "kaiming", "gaussian", "eva", "orthogonal", "mica", "nora")


def peft_config(lm) -> dict:
    """The adapter_config.json dict PEFT writes for an equivalent LoraConfig."""
    spec = lm.spec
    sites = lm.linear_sites()
    paths = lm.lora_paths()
    return {
        "task_type": _task_type(lm),
        "peft_type": "LORA",
        "auto_mapping": None,
        "base_model_name_or_path": lm._base_name,
        "revision": None,
        "inference_mode": False,
        "r": spec.r,
        "target_modules": _target_modules(paths, [p for p in sites if spec.in_layers(p)]),
        "exclude_modules": None,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "fan_in_fan_out": any(sites[p].fan_in_fan_out for p in paths),
        "bias": spec.bias,
        "use_rslora": spec.use_rslora,
        "modules_to_save": list(spec.modules_to_save) or None,
        "init_lora_weights": spec.peft_init_lora_weights,
        "layers_to_transform": list(spec.layers) if isinstance(spec.layers, tuple) else spec.layers,
        "layers_pattern": list(spec.layers_pattern) if spec.layers_pattern else None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {"loftq_bits": 4, "loftq_iter": spec.loftq_iter} if spec.init == "loftq" else {},
        "use_dora": spec.use_dora,
        "layer_replication": None,
        "lora_bias": False,
    }


def _task_type(lm):
    return next((task for suffix, task in TASK_TYPES.items() if lm.model_class.endswith(suffix)), None)


def _target_modules(lora_paths: list[str], linear_paths: list[str]) -> list[str]:
    """PEFT matches a list entry by `key == t or key.endswith("." + t)`: write short names
    ("q_proj") when they select exactly our LoRA layers among `linear_paths` (those in the
    spec's layers), else the full paths."""
    short = sorted({p.rsplit(".", 1)[-1] for p in lora_paths})
    selected = {p for p in linear_paths if any(p == s or p.endswith("." + s) for s in short)}
    return short if selected == set(lora_paths) else sorted(lora_paths)


def save_adapter(lm, directory) -> None:
    """A LoRA model's adapter folder (lorafx.variants.files_for picks the module per spec type)."""
    write_adapter(directory, adapter_tensors(lm), peft_config(lm))


def adapter_tensors(lm) -> dict[str, torch.Tensor]:
    """lm.named_lora_parameters() under PEFT's keys, on the CPU."""
    return {KEY_PREFIX + name: p.detach().to("cpu").contiguous() for name, p in lm.named_lora_parameters()}


def converted_to_lora(lm, initial_dir) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's path_initial_model_for_weight_conversion: a PiSSA model's adapter as a plain LoRA
    adapter for the ORIGINAL base. With W = W_res + s·B0·A0 at init and W_res + s·B·A after
    training, ΔW = s·(B·A − B0·A0) = s·[B | −B0]·[A ; A0]: rank 2r, same scale (alpha doubles,
    ×√2 under rsLoRA). `initial_dir` is the adapter saved right after transform."""
    spec = lm.spec
    if spec.init == "loftq" or spec.use_dora:
        what = "LoftQ's base is NF4(W), not W" if spec.init == "loftq" else "DoRA's magnitude rescales W"
        raise AdapterError(f"cannot convert to a plain LoRA adapter: {what}, so no LoRA update reproduces it")
    initial_dir = os.fspath(initial_dir)
    config, initial = read_adapter(initial_dir)
    theirs = (config["r"], config["lora_alpha"], bool(config.get("use_rslora", False)))
    if theirs != (spec.r, spec.alpha, spec.use_rslora):
        raise AdapterError(
            f"{initial_dir} has r={theirs[0]}, lora_alpha={theirs[1]}, use_rslora={theirs[2]}; the model has "
            f"r={spec.r}, alpha={spec.alpha}, use_rslora={spec.use_rslora}: not this model's initial adapter"
        )
    trained = adapter_tensors(lm)
    if initial.keys() != trained.keys():
        missing = sorted(set(trained) ^ set(initial))[0]
        raise AdapterError(f"{initial_dir} and the model differ in {missing!r}: not this model's initial adapter")
    tensors = {}
    for key, value in trained.items():
        if initial[key].shape != value.shape:
            raise AdapterError(f"{initial_dir}: {key} has shape {tuple(initial[key].shape)}, the model {tuple(value.shape)}")
        if ".lora_A." in key:
            tensors[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            tensors[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:  # modules_to_save: trained in full, as they are
            tensors[key] = value
    config = peft_config(lm)
    config.update(r=2 * spec.r, lora_alpha=spec.alpha * (2**0.5 if spec.use_rslora else 2), init_lora_weights=True)
    return tensors, config


def write_adapter(directory, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Both files of a PEFT adapter folder, atomically as a pair (readers see one save's pair)."""
    directory = check_folder_path(directory, "adapter")
    config = json.dumps(config, indent=2, sort_keys=True)
    write_atomically(
        {
            os.path.join(directory, WEIGHTS_NAME): lambda tmp: safetensors.torch.save_file(
                tensors, tmp, metadata={"format": "pt"}
            ),
            os.path.join(directory, CONFIG_NAME): write_text(config),
        }
    )


def read_config(directory, check=None) -> dict:
    """adapter_config.json, checked by `check(config, path)` (default: check_config, a LoraConfig)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        what = "is a file, not a folder" if os.path.exists(directory) else "does not exist"
        raise FileNotFoundError(f"adapter folder {directory!r} {what}")
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing: not a PEFT adapter folder")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from e
    return (check or check_config)(config, path)


SPEC_NAMES = {"LORA": "LoraSpec", "IA3": "IA3Spec", "VERA": "VeraSpec"}  # peft_type → the lorafx spec for it


def wrong_type_hint(config: dict) -> str:
    """What to transform with instead, for an adapter of another peft_type."""
    spec = SPEC_NAMES.get(config.get("peft_type"))
    return f"; for this one transform with lorafx.{spec}.from_peft_config(folder)" if spec else ""


def check_typed_config(config, path: str, peft_type: str, model: str, fields: tuple[str, ...]) -> dict:
    """A PEFT config dict of `peft_type` with every field in `fields`, for a `model` (e.g. "a VeRA model")."""
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != peft_type:
        raise AdapterError(
            f"{path}: peft_type={config.get('peft_type')!r}, but this is {model}, which loads {peft_type} adapters "
            f"only{wrong_type_hint(config)}"
        )
    for field in fields:
        if config.get(field) is None:
            raise AdapterError(f"{path} has no {field!r} field")
    return config


def check_config(config, path: str, per_layer: bool = False) -> dict:
    """The fields lorafx reads from a PEFT LoraConfig dict are present and supported, and no
    field lorafx does not implement holds a value that changes what the adapter computes.
    `per_layer`: the reader applies rank_pattern / alpha_pattern per layer (combine, diagnose)."""
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        hint = wrong_type_hint(config)
        raise AdapterError(f"{path}: peft_type={config['peft_type']!r}, here lorafx reads LORA adapters only{hint}")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise AdapterError(f"{path} has no {field!r} field")
    if config["target_modules"] is None:
        raise AdapterError(
            f"{path}: target_modules=None: PEFT fills in per-architecture defaults there, which lorafx does not; "
            "list the targets (e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear')"
        )
    for field, (valid, allowed) in CONFIG_VALUES.items():
        if field in config and not valid(config[field]):
            raise AdapterError(f"{path}: {field}={config[field]!r} is invalid: allowed is {allowed}")
    layers, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    if pattern and layers is None:  # PEFT's LoraConfig refuses both of these
        raise AdapterError(f"{path}: layers_pattern={pattern!r} needs layers_to_transform (the indices), got null")
    if layers not in (None, []) and isinstance(config["target_modules"], str):
        raise AdapterError(
            f"{path}: layers_to_transform={layers!r} with a regex target_modules={config['target_modules']!r} is "
            "invalid (PEFT refuses it too): allowed is a list of module names"
        )
    check_implemented(config, path, per_layer)
    return config


# LoraConfig fields (PEFT 0.22) lorafx does not implement and that change what a loaded adapter
# computes: the values meaning "off" (PEFT's default; what lorafx computes) and what the field does.
UNIMPLEMENTED = {
    "bias": (("none",), "'all' / 'lora_only' train the base model's biases, saved in the adapter"),
    "lora_bias": ((False,), "it adds a trained bias to lora_B"),
    "target_parameters": ((None, []), "it puts LoRA on nn.Parameters such as MoE expert weights"),
    "trainable_token_indices": ((None, [], {}), "it trains embedding rows, saved as token_adapter deltas"),
    "layer_replication": ((None, []), "it stacks copies of the model's layers, each with its own adapter"),
    "megatron_config": ((None, {}), "it adapts Megatron's parallel linear layers"),
    "use_qalora": ((False,), "QA-LoRA pools the input of lora_A in groups"),
    "alora_invocation_tokens": ((None,), "aLoRA applies the adapter only from its invocation tokens on"),
    "monteclora_config": ((None,), "MonteCLoRA samples the adapter weights"),
    "kasa_config": ((None,), "KaSA truncates the base weight's SVD and scales B·A by trained singular values"),
    "use_bdlora": ((None,), "BD-LoRA makes lora_A or lora_B block-diagonal"),
    "arrow_config": ((None,), "Arrow routes each token among several adapters"),
}
# Applied per layer by combine and diagnose; a model's adapter has one r and one alpha.
PER_LAYER = {
    "rank_pattern": ((None, {}), "it gives some layers another r"),
    "alpha_pattern": ((None, {}), "it gives some layers another lora_alpha"),
}
# Fields that never change what a loaded adapter computes, so any value is accepted:
READ_AS_IS = (
    # what the adapter is and where it came from
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    # PEFT sets it from the layer type (False on nn.Linear, True on GPT-2's Conv1D), whatever it says
    "fan_in_fan_out",
    # read only with megatron_config / use_qalora, which are checked above
    "megatron_core", "qalora_group_size",
    # inputs to an init (EVA, CorDA, LoRA-GA, Astra): init_lora_weights says whether the base was rewritten
    "eva_config", "corda_config", "lora_ga_config", "astra_config",
    # VeLoRA changes only lora_A's backward (compressed activations); read_adapter drops its buffers
    "velora_config",
    # runtime settings, which PEFT does not save
    "runtime_config",
    # ties adapters on tied embedding / head layers: checked with the targets below
    "ensure_weight_tying",
)
# Fields lorafx implements (checked in CONFIG_VALUES and by the readers).
IMPLEMENTED = (
    "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "use_rslora", "use_dora",
    "modules_to_save", "init_lora_weights", "loftq_config", "layers_to_transform", "layers_pattern",
)
# init_lora_weights values lorafx reproduces: the base-keeping ones (KEEPS_BASE), PiSSA and LoftQ.
REWRITES_BASE = re.compile(r"pissa|pissa_niter_[1-9][0-9]*|loftq")
# PEFT's EMBEDDING_LAYER_NAMES: ensure_weight_tying acts only when one of these is adapted or saved.
TIED_NAMES = ("embed_tokens", "lm_head")


def check_implemented(config: dict, path: str, per_layer: bool = False) -> None:
    """Refuse, naming the field, a LoraConfig field lorafx does not implement set to a value that
    changes the adapter's outputs (a third answer is worse than none)."""
    refused = {**UNIMPLEMENTED, **({} if per_layer else PER_LAYER)}
    for field, (off, what) in refused.items():
        value = config.get(field, off[0])
        if not any(value == v and type(value) is type(v) for v in off):
            allowed = " or ".join(json.dumps(v) for v in off)
            raise AdapterError(f"{path}: {field}={value!r} is not supported by lorafx ({what}); allowed is {allowed}")
    for field, value in config.items():
        if field not in UNIMPLEMENTED and field not in PER_LAYER and field not in READ_AS_IS + IMPLEMENTED and value:
            raise AdapterError(
                f"{path}: {field}={value!r} is not a LoraConfig field lorafx knows (a newer PEFT's?), and it is "
                "set, so it may change what the adapter computes; allowed is null, false or empty"
            )
    init = config.get("init_lora_weights", True)
    if init not in KEEPS_BASE and not (isinstance(init, str) and REWRITES_BASE.fullmatch(init)):
        raise AdapterError(
            f"{path}: init_lora_weights={init!r} is not supported by lorafx (the adapter was trained on a base that "
            "init rewrote, which lorafx cannot rebuild); allowed is true, false, 'gaussian', 'eva', 'orthogonal', "
            "'mica', 'nora', 'pissa', 'pissa_niter_N' or 'loftq'. Save it converted to a plain LoRA adapter with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )
    bits = (config.get("loftq_config") or {}).get("loftq_bits", 4)
    if init == "loftq" and bits != 4:
        raise AdapterError(
            f"{path}: loftq_config.loftq_bits={bits!r} is not supported by lorafx (its LoftQ base is 4-bit NF4); "
            "allowed is 4"
        )
    if config.get("ensure_weight_tying") and _names_tied_layer(config):
        raise AdapterError(
            f"{path}: ensure_weight_tying=True with {', '.join(TIED_NAMES)} adapted or in modules_to_save is not "
            "supported by lorafx (PEFT then ties the adapter of the output head to the input embedding's); "
            "allowed is false"
        )


def _names_tied_layer(config: dict) -> bool:
    """PEFT's _check_tied_modules: is embed_tokens / lm_head in modules_to_save or target_modules?"""
    saved = config.get("modules_to_save") or []
    targets = config["target_modules"]
    if isinstance(saved, str):
        saved = [saved]
    if isinstance(targets, str):
        in_targets = any(re.fullmatch(targets, name) for name in TIED_NAMES)
    else:
        in_targets = any(t.split(".")[-1] in TIED_NAMES for t in targets)
    return in_targets or any(m.split(".")[-1] in TIED_NAMES for m in saved)


def check_per_layer_config(config, path: str) -> dict:
    """check_config for readers that apply rank_pattern / alpha_pattern per layer."""
    return check_config(config, path, per_layer=True)


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_alpha(value) -> bool:
    """A finite number within float32 (0 and negative alphas are allowed, as PEFT allows them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        abs(value) <= ALPHA_LIMIT
    )


def _is_names(value) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


def _is_pattern(valid):
    return lambda value: value is None or (
        isinstance(value, dict) and all(isinstance(k, str) and valid(v) for k, v in value.items())
    )


ALPHA_ALLOWED = f"a finite number with |lora_alpha| <= {ALPHA_LIMIT:.7g} (float32's largest)"
# adapter_config.json fields lorafx reads: a check and what it allows (for the message).
CONFIG_VALUES = {
    "r": (_is_rank, "an integer >= 1"),
    "lora_alpha": (_is_alpha, ALPHA_ALLOWED),
    "target_modules": (lambda v: isinstance(v, str) or _is_names(v), "a regex string or a list of module names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _is_names(v), "null, a regex or a list of names"),
    "modules_to_save": (lambda v: v is None or isinstance(v, str) or _is_names(v), "null or a list of module names"),
    "lora_dropout": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
        "a number with 0 <= lora_dropout <= 1",
    ),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or an init name such as 'pissa'"),
    "rank_pattern": (_is_pattern(_is_rank), "null or an object of module patterns to integers >= 1"),
    "layers_to_transform": (
        lambda v: v is None or _is_index(v) or (isinstance(v, list) and all(_is_index(i) for i in v)),
        "null, an integer >= 0 or a list of them",
    ),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _is_names(v), "null, a regex or a list of them"),
    "alpha_pattern": (_is_pattern(_is_alpha), f"null or an object of module patterns to numbers ({ALPHA_ALLOWED})"),
}


def pattern_value(patterns, path: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key that equals a dotted suffix of the path (regex)."""
    for pattern, value in (patterns or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", path):
                return value
        except re.error as e:
            raise AdapterError(f"pattern {pattern!r} in adapter_config.json is not a regex: {e}") from None
    return default


def layer_scale(config: dict, path: str, r: int) -> float:
    """The scale PEFT gives the layer at `path` of rank `r`: its alpha (alpha_pattern) over r (√r with rsLoRA)."""
    alpha = pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def check_base(config: dict, model_init, what: str, loftq_iter: int = 1) -> None:
    """Refuse an adapter trained on a base its init rewrote (PiSSA, OLoRA, ...) unless the model's
    base was rewritten the same way, and the other way round. PEFT's from_pretrained re-runs the
    adapter's init on the base; load_adapter cannot, the model's base is already in place.
    `loftq_iter`: the model's LoftQ rounds (each round changes the NF4 base)."""
    init = config.get("init_lora_weights", True)
    if init == "loftq" and model_init == "loftq":
        theirs = (config.get("loftq_config") or {}).get("loftq_iter", 1)
        if theirs != loftq_iter:
            raise AdapterError(
                f"{what}: loftq_config.loftq_iter={theirs!r}, but this model was transformed with "
                f"loftq_iter={loftq_iter}: its NF4 base is another one; transform with LoraSpec.from_peft_config(folder)"
            )
    if init == (True if model_init == "kaiming" else model_init) or (init in KEEPS_BASE and model_init in KEEPS_BASE):
        return
    if init in KEEPS_BASE:
        raise AdapterError(
            f"{what}: init_lora_weights={init!r} is an adapter for the original base weights, but this model was "
            f"transformed with init={model_init!r}, which rewrote its base (W minus the adapter's initial part); "
            "load it into a model transformed with the default init"
        )
    raise AdapterError(
        f"{what}: init_lora_weights={init!r}: the adapter was trained on the base that init rewrote (W minus its "
        f"initial B0·A0), but this model was transformed with init={model_init!r}, so its base is another one. "
        "Load it with LoraModel.from_pretrained(model, folder) (transforms the original model with that init, as "
        "PEFT's from_pretrained does), or save it converted to a plain LoRA adapter for the original base: PEFT's "
        "save_pretrained(..., path_initial_model_for_weight_conversion=...) or lorafx's "
        "save_adapter(..., convert_from=initial_folder)"
    )


def read_adapter(directory, check=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json (checked as read_config does) and the tensors, both of one save:
    read under the folder's shared lock, so a concurrent save_adapter cannot mix its pair in."""
    directory = os.fspath(directory)
    with locked_folder(directory):
        config = read_config(directory, check)
        tensors = read_tensors(directory)
    if config.get("velora_config"):
        # VeLoRA's projection buffers serve only its backward; the forward is plain LoRA's.
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".lora_velora_embed")}
    return config, tensors


def read_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            raise AdapterError(
                f"{directory} holds only adapter_model.bin (pickle), which lorafx never loads; "
                "re-save it with safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{path} is missing")
    try:
        tensors = safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is not a valid safetensors file: {e}") from e
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterError(f"{path}: {key} is {value.dtype}; adapter weights must be floating point")
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise AdapterError(f"{path}: {key} holds {bad} NaN/Inf value(s); adapter weights must be finite")
    return tensors


def load_adapter(lm, directory) -> None:
    """A LoRA adapter folder into `lm`. Check everything first (config, key set, shapes), then copy: no partial loads."""
    directory = os.fspath(directory)
    config, tensors = read_adapter(directory)
    spec = lm.spec
    if config["r"] != spec.r:
        raise AdapterError(f"adapter r={config['r']} but the model was transformed with r={spec.r}")
    theirs = (config["lora_alpha"], bool(config.get("use_rslora", False)), bool(config.get("use_dora", False)))
    if theirs != (spec.alpha, spec.use_rslora, spec.use_dora):
        raise AdapterError(
            f"adapter lora_alpha={theirs[0]}, use_rslora={theirs[1]}, use_dora={theirs[2]} but the model has "
            f"alpha={spec.alpha}, use_rslora={spec.use_rslora}, use_dora={spec.use_dora}; "
            f"transform with LoraSpec.from_peft_config({directory!r})"
        )
    check_base(config, spec.init, os.path.join(directory, CONFIG_NAME), spec.loftq_iter)
    load_tensors(lm, tensors)


def load_tensors(lm, tensors: dict[str, torch.Tensor]) -> None:
    """PEFT-keyed tensors into lm.named_lora_parameters(): key set and every shape checked before any copy."""
    loaded = {}
    for key, value in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"unexpected key {key!r}: PEFT keys start with {KEY_PREFIX!r}")
        loaded[key[len(KEY_PREFIX):].replace(".default.", ".")] = value
    params = dict(lm.named_lora_parameters())
    missing = sorted(set(params) - set(loaded))
    if missing:
        raise AdapterError(f"adapter lacks {KEY_PREFIX + missing[0]} ({len(missing)} keys missing)")
    unexpected = sorted(set(loaded) - set(params))
    if unexpected:
        raise AdapterError(
            f"adapter has {KEY_PREFIX + unexpected[0]}, which this model has no LoRA layer for "
            f"({len(unexpected)} unexpected keys); is it for another model or other targets?"
        )
    for name, p in params.items():
        if tuple(loaded[name].shape) != tuple(p.shape):
            raise AdapterError(
                f"{KEY_PREFIX + name} has shape {tuple(loaded[name].shape)}, the model expects {tuple(p.shape)}"
            )
        loaded[name] = in_dtype(loaded[name], p.dtype, KEY_PREFIX + name)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(loaded[name])


def in_dtype(value: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """`value` cast to the model's `dtype`, refused if a finite value overflows there (float32 → float16)."""
    cast = value.to(dtype)
    if not torch.isfinite(cast).all():
        largest = float(value.abs().max())
        raise AdapterError(
            f"{key} holds values up to {largest:.4g}, beyond {dtype}'s range (largest {torch.finfo(dtype).max:.4g}): "
            "it would load as inf"
        )
    return cast
