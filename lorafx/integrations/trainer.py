"""Trainer checkpoints as PEFT adapter folders: `lorafx.adapter_trainer(TrainerClass)`.

transformers' Trainer saves a model with `save_pretrained` only when it is a PreTrainedModel
or a PeftModel (an isinstance test); anything else gets its whole state_dict written to
model.safetensors, which holds the base weights, is no adapter, and fails on tied embeddings
("Some tensors share memory"). A LoraModel is neither class, and no callback can help: the
save happens before `on_save` runs. So lorafx gives the trainer class itself the PEFT
behaviour, for any Trainer subclass (TRL's SFTTrainer and DPOTrainer included), in one line:

    SFTTrainer = lorafx.adapter_trainer(trl.SFTTrainer)

The subclass writes every checkpoint and `save_model()` folder as PEFT does (adapter files,
the tokenizer, training_args.bin), loads the adapter back on `resume_from_checkpoint` and for
`load_best_model_at_end`; everything else is the trainer's own code. Models other than a
LoraModel go through the trainer unchanged.

Trainers with a reference model (TRL's DPOTrainer) take reference log-probs from a PEFT model
with its adapter disabled when ref_model is None, but only from a PeftModel (an isinstance
test again); for anything else they load a second copy of the base model from its hub name.
For a LoraModel and ref_model=None, the subclass passes a ReferenceModel instead: the same
LoraModel run inside disable_adapters(), no weight copied.
"""

from __future__ import annotations

import inspect
import os

import torch

from lorafx.core.model import LoraModel

_SUBCLASSES: dict[type, type] = {}


def adapter_trainer(trainer_class: type | None = None) -> type:
    """`trainer_class` (default transformers.Trainer) whose checkpoints of a LoraModel are PEFT
    adapter folders (see the module docstring). The same class comes back on every call."""
    import transformers  # the integration room reads transformers at call time, like the trainers do

    trainer_class = transformers.Trainer if trainer_class is None else trainer_class
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, transformers.Trainer)):
        raise TypeError(f"adapter_trainer takes transformers.Trainer or a subclass (e.g. trl.SFTTrainer), got {trainer_class!r}")
    if issubclass(trainer_class, AdapterCheckpoints):
        return trainer_class
    if trainer_class not in _SUBCLASSES:
        doc = f"{trainer_class.__name__} whose checkpoints of a LoraModel are PEFT adapter folders (lorafx)."
        _SUBCLASSES[trainer_class] = type(
            trainer_class.__name__, (AdapterCheckpoints, trainer_class), {"__doc__": doc, "__module__": __name__}
        )
    return _SUBCLASSES[trainer_class]


class ReferenceModel(torch.nn.Module):
    """The base model behind a LoraModel's adapter, as a trainer's ref_model: every call runs the
    LoraModel inside disable_adapters(). It owns no parameters (the LoraModel is not a submodule)."""

    def __init__(self, lm: LoraModel):
        super().__init__()
        self.__dict__["lm"] = lm
        self.config = lm.config

    def forward(self, *args, **kwargs):
        with self.lm.disable_adapters():
            return self.lm(*args, **kwargs)

    @property
    def base_model(self):
        """The backbone with the adapter disabled (what TRL's fused LM head runs)."""

        def run(**inputs):
            with self.lm.disable_adapters():
                return self.lm.base_model(**inputs)

        return run

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()


class AdapterCheckpoints:
    """The Trainer methods that save and load model weights, for a LoraModel: PEFT adapter folders."""

    def __init__(self, *args, **kwargs):
        signature = inspect.signature(super().__init__)
        bound = signature.bind_partial(*args, **kwargs)
        training_args = bound.arguments.get("args")
        if getattr(training_args, "torch_compile_backend", None) == "lorafx":
            # accelerate's TorchDynamoPlugin only takes the backends its enum lists.
            raise ValueError(
                'torch_compile_backend="lorafx" is refused by accelerate (its DynamoBackend enum); '
                'pass the compiled model instead: Trainer(model=torch.compile(lm, backend="lorafx"), ...) '
                "with torch_compile=False"
            )
        if "ref_model" in signature.parameters:
            model = bound.arguments.get("model")
            if isinstance(model, LoraModel) and bound.arguments.get("ref_model") is None:
                bound.arguments["ref_model"] = ReferenceModel(model)
                args, kwargs = bound.args, bound.kwargs
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        """Through torch.compile, the columns LoraModel.forward names (the compiled wrapper's forward
        is (*args, **kwargs), which would make Trainer drop every column); otherwise the trainer's
        own choice (TRL's trainers set theirs)."""
        lm = self._lora_model()
        if self._signature_columns is None and lm is not None and lm is not self.model:
            names = list(inspect.signature(type(lm).forward).parameters)[1:]  # without self
            self._signature_columns = names + sorted({"label", "label_ids", *self.label_names})
        super()._set_signature_columns_if_needed()

    def _lora_model(self, model=None) -> LoraModel | None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return model if isinstance(model, LoraModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        lm = self._lora_model()
        if lm is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        lm.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # as Trainer._save writes it
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        lm = self._lora_model(model)
        if lm is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_adapters(lm, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        lm = self._lora_model()
        if lm is None:
            return super()._load_best_model()
        _load_adapters(lm, self.state.best_model_checkpoint)
        return None


def _load_adapters(lm: LoraModel, folder: str) -> None:
    """The adapters save_pretrained wrote to `folder`, back into `lm` (named ones from their subfolders)."""
    if lm._adapters is None:
        lm.load_adapter(folder)
        return
    raise NotImplementedError(
        "resuming a Trainer run of a model with named adapters is not supported: they are frozen, "
        "only the model's own adapter trains; train before loading named adapters"
    )
