"""save_checkpoint / load_checkpoint: a killed run resumes to the same adapter bit for bit,
the same seed gives the same adapter, and the folder is replaced atomically."""

import json
import os
import random
import signal
import subprocess
import sys

import numpy
import pytest
import safetensors.torch
import torch
from conftest import MLP

import lorafx

sys.path.insert(0, os.path.dirname(__file__))
import train_run  # noqa: E402

RUN = [sys.executable, train_run.__file__]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and one SIGKILLed while writing its step-6 checkpoint, side by side."""
    full, killed = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("killed")
    procs = [
        subprocess.Popen([*RUN, str(full)], stderr=subprocess.PIPE, text=True),
        subprocess.Popen([*RUN, str(killed), "--kill-while-saving", "6"], stderr=subprocess.PIPE, text=True),
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert procs[0].returncode == 0, errors[0]
    assert procs[1].returncode == -signal.SIGKILL, errors[1]
    return full, killed


def test_killed_run_resumes_to_the_same_adapter_bit_for_bit(runs):
    full, killed = runs
    checkpoint = killed / "checkpoint"
    # The kill hit step 6's write: step 4's checkpoint is intact, the half-written one is a temp folder.
    assert json.loads((checkpoint / "training_state.json").read_text())["step"] == 4
    assert sorted(os.listdir(checkpoint)) == [
        "adapter_config.json", "adapter_model.safetensors", "training_state.json", "training_state.safetensors"
    ]
    assert [p.name.startswith(".checkpoint.tmp-") for p in killed.iterdir() if p.name != "checkpoint"] == [True]

    resumed = subprocess.run([*RUN, str(killed), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = "final/adapter_model.safetensors"
    assert (killed / final).read_bytes() == (full / final).read_bytes()
    state = "checkpoint/training_state.safetensors"  # optimizer state and RNG states too
    theirs, ours = safetensors.torch.load_file(full / state), safetensors.torch.load_file(killed / state)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_same_seed_same_adapter_in_another_process(runs, tmp_path):
    full, _ = runs
    train_run.train(str(tmp_path))  # this process; `full` came from a fresh one
    final = "final/adapter_model.safetensors"
    assert (tmp_path / final).read_bytes() == (full / final).read_bytes()
    trained = safetensors.torch.load_file(tmp_path / final)
    assert all(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k)  # it did train


def mlp_lora(seed=0):
    torch.manual_seed(seed)
    return lorafx.transform(MLP(64, 128, 64), lorafx.LoraSpec(r=4, alpha=8, dropout=0.1), example_args=(torch.randn(3, 64),))


def train_steps(lm, opt, steps, data):
    for _ in range(steps):
        lm(torch.randn(4, 64, generator=data)).square().mean().backward()
        opt.step()
        opt.zero_grad()


# min_8bit_size: bitsandbytes keeps 32-bit state for tensors under 4096 elements, as these are.
@pytest.mark.parametrize("optimizer, kw", [("adamw", {}), ("adamw8bit", {"min_8bit_size": 16}),
                                           ("paged_adamw8bit", {"min_8bit_size": 16})])
def test_resume_in_process_equals_uninterrupted(tmp_path, optimizer, kw):
    """Also the bitsandbytes optimizers, whose state is a nested dict of uint8 and float tensors."""
    if optimizer != "adamw":
        pytest.importorskip("bitsandbytes")
    results = []
    for resume in (False, True):
        lm = mlp_lora()
        opt = lorafx.make_optimizer(optimizer, lm.trainable_parameters(), lr=1e-2, betas=(0.8, 0.9), **kw)
        data = torch.Generator().manual_seed(1)
        train_steps(lm, opt, 3, data)
        if resume:
            lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 3, rng=data)
            lm, data = mlp_lora(), torch.Generator()  # as a fresh process would: the same base model
            opt = lorafx.make_optimizer(optimizer, lm.trainable_parameters(), lr=1e-2, betas=(0.8, 0.9), **kw)
            torch.manual_seed(123)  # the global RNG moved on too; the checkpoint puts it back
            assert lorafx.load_checkpoint(tmp_path / "ckpt", lm, opt, rng=data) == 3
            assert opt.param_groups[0]["betas"] == (0.8, 0.9)
        train_steps(lm, opt, 3, data)
        results.append(dict(lm.named_lora_parameters()))
    if optimizer != "adamw":
        assert torch.uint8 in {t.dtype for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_python_and_numpy_rng_states_come_back(tmp_path):
    lm = mlp_lora()
    opt = lorafx.make_optimizer("adamw", lm.trainable_parameters(), lr=1e-2)
    lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 0)
    expected = (random.random(), numpy.random.rand(), torch.rand(1))
    lorafx.load_checkpoint(tmp_path / "ckpt", lm, opt)
    assert (random.random(), numpy.random.rand(), torch.rand(1)) == expected


def test_no_pickle_only_safetensors_and_json(tmp_path):
    lm = mlp_lora()
    opt = lorafx.make_optimizer("adamw", lm.trainable_parameters(), lr=1e-2)
    train_steps(lm, opt, 1, torch.Generator())
    lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 1)
    for name in os.listdir(tmp_path / "ckpt"):
        data = (tmp_path / "ckpt" / name).read_bytes()
        if name.endswith(".json"):
            json.loads(data)
        else:
            assert name.endswith(".safetensors")
            safetensors.torch.load(data)


def test_kill_between_the_two_renames_falls_back_to_the_previous_checkpoint(tmp_path, monkeypatch):
    lm = mlp_lora()
    opt = lorafx.make_optimizer("adamw", lm.trainable_parameters(), lr=1e-2)
    lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 1)
    rename = os.rename
    calls = []

    def fail_second(src, dst):  # the on-disk state a kill between the renames leaves
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError, match="killed"):
        lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 2)
    monkeypatch.setattr(os, "rename", rename)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.previous"]
    assert lorafx.load_checkpoint(tmp_path / "ckpt", lm, opt) == 1
    lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 3)  # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert lorafx.load_checkpoint(tmp_path / "ckpt", lm, opt) == 3
