"""make_optimizer: the torch, bitsandbytes and torchao optimizers train a QLoRA model's LoRA weights."""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model, token_batch

import lorafx


@pytest.fixture(scope="module")
def qlora():
    return lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=8, alpha=16, quantize="nf4")).train()


def train(lm, opt, steps=8):
    ids = token_batch(4, 16)
    losses = []
    for _ in range(steps):
        loss = lm(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name, kw", [
    ("adamw", {}),
    ("adamw8bit", {"min_8bit_size": 16}),  # LoRA weights of a tiny model are under bnb's 4096 default
    ("paged_adamw", {}),
    ("paged_adamw8bit", {"min_8bit_size": 16}),
])
def test_optimizers_train_only_lora(qlora, name, kw):
    if name != "adamw":
        pytest.importorskip("bitsandbytes")
    lm = copy.deepcopy(qlora)
    frozen = {n: t.clone() for n, t in lm.state_dict().items() if ".lora_" not in n}
    opt = lorafx.make_optimizer(name, lm.trainable_parameters(), lr=3e-2, **kw)
    losses = train(lm, opt)
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(t, frozen[n]) for n, t in lm.state_dict().items() if n in frozen)
    if "8bit" in name:
        assert torch.uint8 in {t.dtype for s in opt.state.values() for t in s.values() if torch.is_tensor(t)}


# `make test` installs torchao outside the venv's site-packages: once importable, every
# transformers import prints its CUDA-only .so failures, which `make demo` must not show.
TORCHAO = os.path.join(sys.prefix, "optional", "torchao")
TORCHAO_TRAIN = """
import copy, sys
import lorafx
from conftest import tiny_model
from test_optimizers import train
lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=8, alpha=16, quantize="nf4")).train()
if sys.argv[1] == "cuda":
    lm = lm.cuda()
losses = train(lm, lorafx.make_optimizer(sys.argv[2], lm.trainable_parameters(), lr=3e-2))
print(losses[0], losses[-1])
"""


def train_with_torchao(device, name):
    """(first, last) loss of 8 steps with a torchao optimizer, in a python that can import torchao."""
    if importlib.util.find_spec("torchao") is None and not os.path.isdir(TORCHAO):
        pytest.skip(f"torchao is not installed (make test puts it in {TORCHAO})")
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([TORCHAO, here, os.path.dirname(here)])
    out = subprocess.run(
        [sys.executable, "-c", TORCHAO_TRAIN, device, name], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    first, last = map(float, out.stdout.split()[-2:])
    return first, last


def test_torchao_adamw8bit_on_cpu():
    first, last = train_with_torchao("cpu", "torchao_adamw8bit")
    assert last < first - 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's CPU offload moves state off a GPU")
def test_torchao_cpu_offload_adamw():
    first, last = train_with_torchao("cuda", "cpu_offload_adamw")
    assert last < first - 0.1


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed")
def test_missing_torchao_names_the_package(qlora):
    with pytest.raises(ImportError, match="pip install torchao"):
        lorafx.make_optimizer("torchao_adamw8bit", qlora.trainable_parameters(), lr=1e-3)


def test_unknown_name_and_no_parameters():
    with pytest.raises(ValueError, match="optimizer 'adam' is unknown: allowed are 'adamw', 'adamw8bit'"):
        lorafx.make_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="got no parameters"):
        lorafx.make_optimizer("adamw", [], lr=1e-3)
