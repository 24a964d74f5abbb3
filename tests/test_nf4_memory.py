"""QLoRA in eager mode keeps NF4 weights 4-bit through the backward (lorafx/core/nf4_memory.py)."""

import contextlib

import pytest
import torch
from conftest import tiny_model, token_batch
from torch.multiprocessing.reductions import StorageWeakRef

import lorafx
from lorafx.kernels import nf4 as nf4_kernels


def forward_then_backward(arch, hooks: bool, **spec):
    """(dequantized weights still alive between forward and backward, total, LoRA grads)."""
    lm = lorafx.transform(tiny_model(arch), lorafx.LoraSpec(r=4, quantize="nf4", **spec))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(std=0.1)
    if not hooks:
        lm._nf4_saved_as_nf4 = contextlib.nullcontext
    storages = []
    observe = lambda out, args: storages.append(StorageWeakRef(out.untyped_storage()))  # noqa: E731
    nf4_kernels.DEQUANT_OBSERVERS.append(observe)
    try:
        ids = token_batch()
        out = lm(ids, labels=ids)
    finally:
        nf4_kernels.DEQUANT_OBSERVERS.remove(observe)
    alive = sum(not s.expired() for s in storages)
    out.loss.backward()
    return alive, len(storages), {name: p.grad for name, p in lm.named_lora_parameters()}


@pytest.mark.parametrize(
    "arch, spec", [("llama", {"quantize_skip": []}), ("gpt2", {}), ("llama", {"checkpoint": "layer"})]
)
def test_dequantized_weights_are_not_kept_for_the_backward(arch, spec):
    alive, made, grads = forward_then_backward(arch, True, **spec)
    alive_without, _, reference = forward_then_backward(arch, False, **spec)
    assert made > 0 and alive == 0
    if "checkpoint" not in spec:  # the control: plain autograd keeps them (checkpointing frees them)
        assert alive_without > made // 2
    assert grads.keys() == reference.keys()
    for name in grads:
        assert torch.equal(grads[name], reference[name]), name  # the same bits


def test_only_eager_training_uses_the_hooks():
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, quantize="nf4"))
    assert lm._nf4_saved_as_nf4() is not None
    with torch.no_grad():
        assert isinstance(lm._nf4_saved_as_nf4(), contextlib.nullcontext)
    plain = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4))
    assert isinstance(plain._nf4_saved_as_nf4(), contextlib.nullcontext)
