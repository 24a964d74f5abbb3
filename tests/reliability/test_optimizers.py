"""make_optimizer: the torch, bitsandbytes and torchao optimizers train a QLoRA model's LoRA weights."""

import copy
import importlib.util

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


def test_torchao_adamw8bit_on_cpu(qlora):
    pytest.importorskip("torchao")
    lm = copy.deepcopy(qlora)
    losses = train(lm, lorafx.make_optimizer("torchao_adamw8bit", lm.trainable_parameters(), lr=3e-2))
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's CPU offload moves state off a GPU")
def test_torchao_cpu_offload_adamw(qlora):
    pytest.importorskip("torchao")
    lm = copy.deepcopy(qlora).cuda()
    losses = train(lm, lorafx.make_optimizer("cpu_offload_adamw", lm.trainable_parameters(), lr=3e-2))
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed")
def test_missing_torchao_names_the_package(qlora):
    with pytest.raises(ImportError, match="pip install torchao"):
        lorafx.make_optimizer("torchao_adamw8bit", qlora.trainable_parameters(), lr=1e-3)


def test_unknown_name_and_no_parameters():
    with pytest.raises(ValueError, match="optimizer 'adam' is unknown: allowed are 'adamw', 'adamw8bit'"):
        lorafx.make_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="got no parameters"):
        lorafx.make_optimizer("adamw", [], lr=1e-3)
