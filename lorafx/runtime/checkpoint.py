"""Training checkpoints that resume bit for bit: adapter, optimizer state, step and RNG states.

    lorafx.save_checkpoint("run/checkpoint", lm, opt, step, rng=data_generator)
    step = lorafx.load_checkpoint("run/checkpoint", lm, opt, rng=data_generator)

A checkpoint folder holds safetensors and JSON only (nothing is pickled, nothing unpickled):

    adapter_model.safetensors, adapter_config.json   the adapter exactly as save_adapter writes
                                                     it, so the folder also loads in PEFT
    training_state.safetensors                       every tensor of optimizer.state_dict() and
                                                     the torch RNG states
    training_state.json                              step, the optimizer state's structure (its
                                                     tensors named by key), python/numpy RNG states

The folder is written whole into a temp folder beside it, flushed to disk, and renamed into
place. The previous checkpoint is renamed to `<name>.previous` just before and deleted just
after, so a kill at any moment leaves a complete checkpoint at `<name>` or, between the two
renames, at `<name>.previous`, which load_checkpoint falls back to. A save killed before its
renames leaves a `.<name>.tmp-*` folder beside it, which is safe to delete. A `<name>` that is
a symlink to a folder is written through: the folder it points to is replaced, the link kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import sys

import safetensors
import safetensors.torch
import torch
from torch.distributed.tensor import DTensor

from lorafx.core.model import LoraModel
from lorafx.formats.checkpoints import CheckpointError
from lorafx.formats.files import check_folder_path, write_atomically, write_text
from lorafx.variants import files_for

FORMAT = "lorafx.training_checkpoint"
VERSION = 1
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
PREVIOUS = ".previous"


def save_checkpoint(directory, lm: LoraModel, optimizer: torch.optim.Optimizer, step: int,
                    rng: torch.Generator | None = None) -> None:
    """Write the checkpoint folder `directory`, replacing the previous one atomically.

    `rng` is a generator the training loop draws from besides the global RNGs, e.g. the
    DataLoader's `generator=`; give the same one to load_checkpoint. The global RNGs (torch
    CPU, CUDA when available, python `random`, numpy when imported) are always saved.
    With DDP, call it on one rank with the LoraModel (`ddp.module`).
    """
    if not isinstance(lm, LoraModel):
        raise TypeError(f"lm must be a lorafx.LoraModel (for DDP pass ddp.module), got {type(lm).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (its state is part of the checkpoint), got "
                        f"{type(optimizer).__name__}; to save the adapter alone use lm.save_adapter(directory)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} is invalid: allowed is an integer >= 0")
    # A symlinked folder is written through: its target is replaced, the link stays.
    directory = os.path.realpath(check_folder_path(directory, "checkpoint"))
    if os.path.lexists(directory) and not _replaceable(directory):
        raise FileExistsError(f"{directory} exists and is not a lorafx checkpoint folder; refusing to replace it")
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "optimizer": {
            "class": type(optimizer).__qualname__,
            "param_names": _param_names(lm, optimizer),
            "state_dict": _flatten(optimizer.state_dict(), "optimizer", tensors),
        },
        "rng": _rng_state(rng, tensors),
    }
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(8)}")
    os.mkdir(tmp)  # mode 0777 minus the umask, like any folder (mkdtemp's would be 0700)
    try:
        files_for(lm.spec).save_adapter(lm, tmp)
        write_atomically(
            {
                os.path.join(tmp, STATE_TENSORS): lambda path: safetensors.torch.save_file(tensors, path),
                os.path.join(tmp, STATE_JSON): write_text(json.dumps(state)),
            }
        )
        _fsync_folder(tmp)
        _replace_folder(tmp, directory)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def load_checkpoint(directory, lm: LoraModel, optimizer: torch.optim.Optimizer,
                    rng: torch.Generator | None = None) -> int:
    """Restore the adapter, optimizer state and RNG states save_checkpoint wrote; return the step.

    Everything is read and checked first, so a bad or mismatched checkpoint raises
    (CheckpointError, AdapterError) and leaves lm, optimizer and the RNGs as they were.
    """
    if not isinstance(lm, LoraModel):
        raise TypeError(f"lm must be a lorafx.LoraModel (for DDP pass ddp.module), got {type(lm).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (its state is part of the checkpoint), got "
                        f"{type(optimizer).__name__}; to save the adapter alone use lm.save_adapter(directory)")
    directory = _existing_checkpoint(os.path.realpath(os.fspath(directory)))
    state = _read_state(directory)
    tensors = _read_tensors(directory)
    if rng is not None and "generator" not in state["rng"]:
        raise CheckpointError(f"{directory} was saved without rng=, so it holds no generator state to restore")
    if rng is None and "generator" in state["rng"]:
        raise CheckpointError(
            f"{directory} holds the state of the generator given as rng= to save_checkpoint; pass that "
            "generator (rng=...) so the resumed run draws the same data"
        )
    try:
        saved = state["optimizer"]
        saved_class, saved_names = saved["class"], saved["param_names"]
        optimizer_state = _unflatten(saved["state_dict"], tensors)
        restore_rng = _rng_restorer(state["rng"], tensors, rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{directory}/{STATE_JSON} is malformed or does not match its tensors ({e!r})") from e
    if saved_class != type(optimizer).__qualname__:
        raise CheckpointError(
            f"{directory} holds the state of a {saved_class} optimizer, got a {type(optimizer).__qualname__}"
        )
    names = _param_names(lm, optimizer)
    if names != saved_names:
        raise CheckpointError(
            f"{directory}: the optimizer's parameters differ from the checkpoint's "
            f"({[len(g) for g in names]} vs {[len(g) for g in saved_names]} parameters per group); "
            "build it over lm.trainable_parameters() as in the saved run"
        )
    _check_moment_shapes(directory, optimizer, optimizer_state, names)
    files_for(lm.spec).load_adapter(lm, directory)  # checks config, keys and shapes before copying
    optimizer.load_state_dict(optimizer_state)
    restore_rng()
    return state["step"]


# -- optimizer state as tensors + JSON ---------------------------------------------------------
# Per-element optimizer state (torch's Adam/AdamW/SGD/RMSprop/Adagrad/Adadelta/Adamax,
# bitsandbytes' 8-bit state1/state2): shaped like the parameter. Other entries (step, bnb's
# absmax and qmap) have shapes of their own.
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum",
           "exp_inf", "state1", "state2")


def _check_moment_shapes(directory, optimizer, optimizer_state, names) -> None:
    """Each saved moment has its parameter's shape: else the load succeeds and the next step crashes.
    A parameter the checkpoint's adapter file stores in another shape is left to load_adapter,
    whose error says the checkpoint is of another model."""
    stored = {}
    with contextlib.suppress(OSError, safetensors.SafetensorError):
        with safetensors.safe_open(os.path.join(directory, "adapter_model.safetensors"), "pt") as f:
            stored = {key.removeprefix("base_model.model."): tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    params = [(n, p) for group, group_names in zip(optimizer.param_groups, names) for n, p in zip(group_names, group["params"])]
    for index, entry in optimizer_state.get("state", {}).items():
        name, p = params[int(index)] if 0 <= int(index) < len(params) else (None, None)
        if p is None:
            raise CheckpointError(f"{directory}: optimizer state for parameter index {index}; the optimizer has {len(params)}")
        for key, value in entry.items():
            if key in MOMENTS and isinstance(value, torch.Tensor) and value.shape != p.shape \
                    and stored.get(name, tuple(p.shape)) == tuple(p.shape):
                raise CheckpointError(
                    f"{directory}: optimizer state {key!r} of {name} has shape {tuple(value.shape)}; "
                    f"the parameter has shape {tuple(p.shape)}"
                )


def _param_names(lm: LoraModel, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The LoRA names of each group's parameters: what lets a load check it has the same setup."""
    names = {id(p): name for name, p in lm.named_lora_parameters()}
    groups = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not a LoRA weight of "
                    "this LoraModel; a checkpoint stores the adapter only, so it could not restore it"
                )
            if isinstance(p, DTensor):
                raise ValueError(
                    "the LoRA weights are sharded (FSDP2 DTensors); save with torch.distributed.checkpoint"
                )
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def _flatten(value, key: str, tensors: dict[str, torch.Tensor]):
    """JSON for `value`, with each tensor moved into `tensors` under its path and referenced by it.

    Every dict and tuple is tagged ({"dict": [[key, value], ...]}, {"tuple": [...]}), so int
    keys (optimizer state is keyed by parameter index) and tuples (betas) come back as they were.
    """
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"optimizer state key {key!r} appears twice; its names must not contain '/'")
        # A copy: safetensors refuses tensors that share memory (bitsandbytes shares its quantile maps).
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        for k in value:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"optimizer state {key} has a key {k!r}; a checkpoint stores str or int keys only")
        return {"dict": [[k, _flatten(v, f"{key}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"optimizer state {key} is a {type(value).__name__}; a checkpoint stores tensors, numbers, "
        "strings, lists, tuples and dicts only"
    )


def _unflatten(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if isinstance(value, dict):
        (tag, body), = value.items()
        if tag == "tensor":
            return tensors[body]
        if tag == "tuple":
            return tuple(_unflatten(v, tensors) for v in body)
        if tag == "dict":
            return {k: _unflatten(v, tensors) for k, v in body}
        raise ValueError(f"unknown tag {tag!r}")
    return value


# -- RNG states -------------------------------------------------------------------------------
def _rng_state(rng: torch.Generator | None, tensors: dict[str, torch.Tensor]) -> dict:
    tensors["rng/torch"] = torch.get_rng_state()
    state = {"python": random.getstate()}
    if "numpy" in sys.modules:  # numpy's global RNG matters only to a program that imported numpy
        name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = [name, keys.tolist(), pos, has_gauss, cached]
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state_all()
        state["cuda"] = len(cuda)
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(cuda)})
    if rng is not None:
        state["generator"] = True
        tensors["rng/generator"] = rng.get_state()
    return state


def _rng_restorer(state: dict, tensors: dict[str, torch.Tensor], rng: torch.Generator | None):
    """A function that sets the saved RNG states. Each state is tried on a throwaway generator
    first, so a malformed one raises here, before load_checkpoint changes anything."""
    torch_state = tensors["rng/torch"]
    torch.Generator().set_state(torch_state)
    version, internal, gauss = state["python"]
    python_state = (version, tuple(internal), gauss)
    random.Random().setstate(python_state)
    numpy_random = numpy_state = None
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy_state = (name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached)
        numpy.random.RandomState().set_state(numpy_state)
        numpy_random = numpy.random
    # CUDA states are restored where CUDA is; a run resumed on fewer GPUs restores those it has.
    devices = min(state.get("cuda", 0), torch.cuda.device_count() if torch.cuda.is_available() else 0)
    cuda_states = [tensors[f"rng/cuda/{i}"] for i in range(devices)]
    generator_state = tensors["rng/generator"] if rng is not None else None
    if rng is not None:
        torch.Generator(rng.device).set_state(generator_state)

    def restore():
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        if numpy_random is not None:
            numpy_random.set_state(numpy_state)
        for i, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, i)
        if rng is not None:
            rng.set_state(generator_state)

    return restore


# -- files ------------------------------------------------------------------------------------
def _existing_checkpoint(directory: str) -> str:
    if not os.path.lexists(directory) and os.path.isdir(directory + PREVIOUS):
        directory += PREVIOUS  # a save was killed between its two renames: this one is complete
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint folder {directory!r} does not exist")
    if not os.path.isfile(os.path.join(directory, STATE_JSON)):
        raise CheckpointError(f"{directory} has no {STATE_JSON}: not a lorafx training checkpoint")
    return directory


def _read_state(directory: str) -> dict:
    path = os.path.join(directory, STATE_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lorafx training checkpoint (no format {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has version {state.get('version')!r}; this lorafx reads version {VERSION}")
    for field, kind in (("step", int), ("optimizer", dict), ("rng", dict)):
        if not isinstance(state.get(field), kind):
            raise CheckpointError(f"{path} field {field!r} is {state.get(field)!r}; expected a {kind.__name__}")
    if isinstance(state["step"], bool) or state["step"] < 0:
        raise CheckpointError(f"{path} field 'step' is {state['step']!r}; expected an integer >= 0")
    return state


def _read_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, STATE_TENSORS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    try:
        return safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e


def _replaceable(folder: str) -> bool:
    """An earlier checkpoint, or an empty folder made ahead of the first save."""
    return os.path.isdir(folder) and (not os.listdir(folder) or os.path.isfile(os.path.join(folder, STATE_JSON)))


def _replace_folder(tmp: str, directory: str) -> None:
    previous = directory + PREVIOUS
    if os.path.isdir(directory):
        if os.path.isdir(previous):
            shutil.rmtree(previous)  # left by a save killed while deleting it; `directory` is newer
        os.rename(directory, previous)
    os.rename(tmp, directory)
    _fsync(os.path.dirname(directory))
    if os.path.isdir(previous):
        shutil.rmtree(previous)


def _fsync_folder(folder: str) -> None:
    """Flush the files and the folder entry to disk, so the rename never publishes a folder
    whose contents a power loss could still take back."""
    for name in os.listdir(folder):
        _fsync(os.path.join(folder, name))
    _fsync(folder)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
