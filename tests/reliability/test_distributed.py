"""DDP and FSDP2 on CPU: two processes on gloo over loopback train a lorafx model (plain and NF4)
and end with the LoRA weights one process gets from the same global batch.

One spawn runs every scenario (starting processes is the slow part); each rank writes what it
found to a safetensors file and a JSON file, and the tests below read them.
"""

import copy
import json
import os
import socket

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model, token_batch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import lorafx

WORLD = 2
STEPS = 3
QUANTIZE = {"plain": None, "nf4": "nf4"}


def optimizer(lm):
    # SGD, not Adam: Adam's first steps are ~lr·sign(g), which turns a 1e-9 reduction-order
    # difference in a near-zero gradient into a full step; SGD keeps the comparison tight.
    return torch.optim.SGD(lm.trainable_parameters(), lr=0.5)


def train(model, lm, ids):
    opt = optimizer(lm)
    for _ in range(STEPS):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def worker(rank, port, out):
    torch.set_num_threads(1)  # two processes on a small machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        ids = token_batch(2 * WORLD, 12)
        tensors, facts = {}, {}
        for name, quantize in QUANTIZE.items():
            base = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, alpha=8, quantize=quantize))
            with torch.no_grad():
                for p in base.trainable_parameters():
                    p.normal_(std=0.1)  # the same on every rank: tiny_model seeded the RNG
            facts["lora_names"] = sorted(n for n, _ in base.named_lora_parameters())
            single = copy.deepcopy(base)
            train(single, single, ids)
            tensors.update(lora(f"{name}/single", single))
            run_ddp(rank, base, ids.chunk(WORLD)[rank], os.path.join(out, name), tensors, facts)
            run_fsdp2(rank, base, ids.chunk(WORLD)[rank], os.path.join(out, name), tensors, facts)
        safetensors.torch.save_file(tensors, os.path.join(out, f"{rank}.safetensors"))
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(facts, f)
    finally:
        dist.destroy_process_group()


def lora(prefix, lm):
    return {f"{prefix}/{n}": (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in lm.named_lora_parameters()}


def run_ddp(rank, base, ids, out, tensors, facts):
    name = os.path.basename(out)
    lm = copy.deepcopy(base)
    # NF4 storage is identical on every rank: no need to broadcast its buffers each step.
    ddp = DistributedDataParallel(lm, broadcast_buffers=False)
    names = {id(p): n for n, p in lm.named_lora_parameters()}
    reduced = set()

    def record_then_allreduce(state, bucket):
        reduced.update(names.get(id(p), "not LoRA") for p in bucket.parameters())
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, record_then_allreduce)
    opt = train(ddp, lm, ids)
    tensors.update(lora(f"{name}/ddp", lm))
    facts[f"{name}/ddp/reduced"] = sorted(reduced)

    # The checkpoint recipe under DDP: rank 0 saves ddp.module, every rank loads.
    if rank == 0:
        with pytest.raises(TypeError, match="pass ddp.module"):
            lorafx.save_checkpoint(out + "-checkpoint", ddp, opt, STEPS)
        lorafx.save_checkpoint(out + "-checkpoint", ddp.module, opt, STEPS)
    dist.barrier()
    resumed = copy.deepcopy(base)
    assert lorafx.load_checkpoint(out + "-checkpoint", resumed, optimizer(resumed)) == STEPS
    tensors.update(lora(f"{name}/ddp-resumed", resumed))


def run_fsdp2(rank, base, ids, out, tensors, facts):
    name = os.path.basename(out)
    lm = copy.deepcopy(base)
    fully_shard(lm)
    opt = train(lm, lm, ids)
    tensors.update(lora(f"{name}/fsdp2", lm))
    facts[f"{name}/fsdp2/trainable"] = {n: type(p).__name__ for n, p in lm.named_parameters() if p.requires_grad}
    facts[f"{name}/fsdp2/frozen"] = sorted({type(p).__name__ for p in lm.parameters() if not p.requires_grad})
    facts[f"{name}/fsdp2/buffers"] = sorted({type(b).__name__ for n, b in lm.named_buffers() if "weight_nf4" in n})
    with pytest.raises(ValueError, match="sharded .FSDP2 DTensors.; save with torch.distributed.checkpoint"):
        lorafx.save_checkpoint(f"{out}-fsdp2-{rank}", lm, opt, STEPS)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=WORLD)
    return [
        (safetensors.torch.load_file(out / f"{r}.safetensors"), json.loads((out / f"{r}.json").read_text()))
        for r in range(WORLD)
    ]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("quantize", QUANTIZE)
def test_two_ranks_equal_one_process_on_the_global_batch(ranks, engine, quantize):
    (tensors, facts), (other, _) = ranks
    for name in facts["lora_names"]:
        result = tensors[f"{quantize}/{engine}/{name}"]
        torch.testing.assert_close(result, tensors[f"{quantize}/single/{name}"], rtol=1e-5, atol=1e-6)
        assert torch.equal(result, other[f"{quantize}/{engine}/{name}"])  # the ranks agree exactly
    trained = [n for n in facts["lora_names"] if "lora_B" in n]
    assert all(tensors[f"{quantize}/{engine}/{n}"].abs().sum() > 0 for n in trained)


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_ddp_checkpoint_saved_on_rank_0_loads_on_every_rank(ranks, quantize):
    for tensors, facts in ranks:
        for name in facts["lora_names"]:
            assert torch.equal(tensors[f"{quantize}/ddp-resumed/{name}"], tensors[f"{quantize}/ddp/{name}"])


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_ddp_all_reduces_only_lora_gradients(ranks, quantize):
    for _, facts in ranks:
        assert facts[f"{quantize}/ddp/reduced"] == facts["lora_names"]


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_fsdp2_shards_parameters_and_keeps_nf4_buffers_replicated(ranks, quantize):
    """fully_shard shards parameters only: frozen ones too (DTensor), LoRA ones get sharded
    gradients; NF4 storage is buffers, so every rank keeps its full (identical) copy."""
    for _, facts in ranks:
        assert facts[f"{quantize}/fsdp2/frozen"] == ["DTensor"]
        trainable = facts[f"{quantize}/fsdp2/trainable"]
        assert sorted(n.removeprefix("graph_module.") for n in trainable) == facts["lora_names"]
        assert set(trainable.values()) == {"DTensor"}
        assert facts[f"{quantize}/fsdp2/buffers"] == (["Tensor"] if quantize == "nf4" else [])
