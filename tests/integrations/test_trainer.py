"""transformers Trainer trains a LoraModel unpatched; lorafx.adapter_trainer makes its
checkpoints PEFT adapter folders. PEFT + Trainer on the same data is the oracle."""

import copy
import os

import datasets
import peft
import pytest
import torch
import transformers
from conftest import VOCAB, tiny_model

import lorafx


def dataset(rows=8, seq=12, seed=0):
    """Token rows with a varying number of -100 labels, so micro-batches hold different label counts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    labels = ids.clone()
    for i in range(rows):
        labels[i, : 1 + 2 * (i % 4)] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def arguments(out, **kw):
    defaults = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=4,
                    report_to=[], logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, use_cpu=True)
    return transformers.TrainingArguments(**{**defaults, **kw})


def peft_model(base, arch):
    modules = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=modules)
    return peft.get_peft_model(copy.deepcopy(base), config)


def same_adapter(lm, theirs):
    """lorafx's LoRA parameters set to PEFT's (their init drew other random numbers)."""
    state = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for name, p in lm.named_lora_parameters():
            p.copy_(state["base_model.model." + name])


def adapter_distance(lm, theirs) -> float:
    state = peft.get_peft_model_state_dict(theirs)
    return max((p - state["base_model.model." + name]).abs().max().item() for name, p in lm.named_lora_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_accumulation_gives_peft_trainers_adapter(tmp_path, arch):
    base = tiny_model(arch)
    theirs = peft_model(base, arch)
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4, alpha=8))
    same_adapter(lm, theirs)
    args = dict(gradient_accumulation_steps=2, max_steps=2)
    transformers.Trainer(model=theirs, args=arguments(tmp_path / "peft", **args), train_dataset=dataset()).train()
    transformers.Trainer(model=lm, args=arguments(tmp_path / "ours", **args), train_dataset=dataset()).train()
    # Adam (lr 1e-2) turns last-bit gradient differences of near-zero entries into steps of up to
    # ~1e-6; how many depends on the CPU's matmul kernels (0.0 on one machine, 1.4e-6 on another).
    # A wrong label count (num_items_in_batch or loss_type ignored) is ~1e-2 away.
    assert adapter_distance(lm, theirs) <= 1e-5


def test_trainer_defaults_train_evaluate_checkpoint_and_resume_bit_equal(tmp_path):
    Trainer = lorafx.adapter_trainer(transformers.Trainer)
    assert lorafx.adapter_trainer(transformers.Trainer) is Trainer and issubclass(Trainer, transformers.Trainer)
    base = tiny_model("gpt2")  # tied embeddings: the state dict holds one tensor under two names
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4))
    args = arguments(tmp_path / "run", save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = Trainer(model=lm, args=args, train_dataset=dataset(), eval_dataset=dataset(4, seed=1))
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    final = {name: p.detach().clone() for name, p in lm.named_lora_parameters()}
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert sorted(os.listdir(checkpoint)) >= ["adapter_config.json", "adapter_model.safetensors"]
    assert not (checkpoint / "model.safetensors").exists()

    ids = torch.tensor(dataset()["input_ids"][:2])
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "run" / "checkpoint-4").eval()
    with torch.no_grad():
        torch.testing.assert_close(lm.eval()(ids).logits, reloaded(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    trainer.save_model(tmp_path / "final")
    ours = lorafx.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "final")
    assert all(torch.equal(p, final[name]) for name, p in ours.named_lora_parameters())

    resumed = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4))
    again = Trainer(model=resumed, args=args, train_dataset=dataset(), eval_dataset=dataset(4, seed=1))
    again.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(p, final[name]) for name, p in resumed.named_lora_parameters())


def test_gradient_checkpointing_true_trains_like_without(tmp_path):
    base = tiny_model("llama")
    runs = []
    for checkpointing in (False, True):
        lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4))
        torch.manual_seed(0)
        with torch.no_grad():
            for _, p in lm.named_lora_parameters():
                p.normal_(std=0.1)
        transformers.Trainer(model=lm, args=arguments(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing),
                             train_dataset=dataset()).train()
        assert lm.is_gradient_checkpointing is checkpointing
        runs.append(dict(lm.named_lora_parameters()))
    for name, p in runs[0].items():
        torch.testing.assert_close(runs[1][name], p, rtol=0, atol=1e-6)


def test_compiled_model_trains_like_eager_and_backend_option_is_refused_by_name(tmp_path):
    base = tiny_model("llama")
    eager, compiled = (lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4)) for _ in range(2))
    with torch.no_grad():
        for (_, a), (_, b) in zip(eager.named_lora_parameters(), compiled.named_lora_parameters()):
            b.copy_(a)
    Trainer = lorafx.adapter_trainer()
    Trainer(model=eager, args=arguments(tmp_path / "eager", max_steps=2), train_dataset=dataset()).train()
    trainer = Trainer(model=torch.compile(compiled, backend="lorafx"), args=arguments(tmp_path / "compiled", max_steps=2),
                      train_dataset=dataset())
    trainer.train()
    for (name, a), (_, b) in zip(eager.named_lora_parameters(), compiled.named_lora_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    trainer.save_model(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    args = arguments(tmp_path / "x", torch_compile=True, torch_compile_backend="lorafx")
    with pytest.raises(ValueError, match=r'torch.compile\(lm, backend="lorafx"\)'):
        Trainer(model=eager, args=args, train_dataset=dataset())


def test_accelerate_prepare_and_save_state_round_trip_on_tied_gpt2(tmp_path):
    import accelerate

    base = tiny_model("gpt2")
    states = []
    for folder_loaded in (False, True):
        lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4))
        accelerator = accelerate.Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(lm, torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2))
        if folder_loaded:
            accelerator.load_state(tmp_path / "state")
        else:
            ids = torch.tensor(dataset()["input_ids"][:2])
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            optimizer.step()
            accelerator.save_state(tmp_path / "state")
        states.append(dict(lm.named_lora_parameters()))
    assert all(torch.equal(states[1][name], p) for name, p in states[0].items())
