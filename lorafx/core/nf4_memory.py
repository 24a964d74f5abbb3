"""Keep NF4 weights 4-bit through the backward, as bitsandbytes' MatMul4Bit does.

In an unfused QLoRA graph, `linear(x, nf4_dequant(W))` makes autograd save the dequantized
weight for dx = dy·W: a full-precision copy of every layer's weight lives until the backward.
Inside `saved_nf4_weights()`, the saved-tensor hooks recognise those copies (and views of
them, like the Wᵀ a matmul saves) and store the NF4 arguments instead; the backward
dequantizes again. The gradients are the same bits; the cost is one more dequantization per
layer in the backward. Eager only: compiled graphs plan their own saved tensors.
"""

from __future__ import annotations

import contextlib

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from lorafx.kernels import nf4 as nf4_kernels


@contextlib.contextmanager
def saved_nf4_weights():
    # Dequantized weights made in this forward, by storage (the weight, the view a matmul saves
    # and the pairs tensor the decode reshapes all share it): address → (weak ref, op args).
    made: dict[int, tuple[StorageWeakRef, tuple]] = {}

    def observe(out, args):
        storage = out.untyped_storage()
        made[storage.data_ptr()] = (StorageWeakRef(storage), args)

    def pack(t):
        try:
            entry = made.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            return t
        if entry is None or entry[0].expired():  # not a dequantized weight (or its address reused)
            return t
        return entry[1], tuple(t.shape), t.stride(), t.storage_offset()

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        args, shape, stride, offset = saved
        return torch.ops.lorafx.nf4_dequant(*args).as_strided(shape, stride, offset)

    nf4_kernels.DEQUANT_OBSERVERS.append(observe)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        nf4_kernels.DEQUANT_OBSERVERS.remove(observe)
