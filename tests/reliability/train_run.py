"""A small LoRA training run with checkpoints, for the resume and determinism tests.

    python train_run.py OUT [--resume] [--kill-while-saving STEP]

Trains a tiny Llama (LoRA dropout on, so the torch RNG matters; batches drawn from a data
generator, so its state matters) for STEPS steps, saving a checkpoint every SAVE_EVERY steps
to OUT/checkpoint and the final adapter to OUT/final. --kill-while-saving makes the process
SIGKILL itself in the middle of writing that step's checkpoint, as a crash or a preemption
would: half of training_state.safetensors is on disk when it dies.
"""

import argparse
import os
import signal
import sys

import safetensors.torch
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import VOCAB, tiny_model  # noqa: E402

import lorafx  # noqa: E402

STEPS = 8
SAVE_EVERY = 2


def train(out: str, seed: int = 0, resume: bool = False, kill_while_saving: int | None = None) -> None:
    lm = lorafx.transform(tiny_model("llama", seed=seed), lorafx.LoraSpec(r=4, alpha=8, dropout=0.1)).train()
    opt = lorafx.make_optimizer("adamw", lm.trainable_parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed + 1)
    checkpoint = os.path.join(out, "checkpoint")
    start = lorafx.load_checkpoint(checkpoint, lm, opt, rng=data) if resume else 0
    for step in range(start + 1, STEPS + 1):
        ids = torch.randint(3, VOCAB, (2, 8), generator=data)
        lm(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % SAVE_EVERY == 0:
            if step == kill_while_saving:
                _die_in_next_state_write()
            lorafx.save_checkpoint(checkpoint, lm, opt, step, rng=data)
    lm.save_adapter(os.path.join(out, "final"))


def _die_in_next_state_write() -> None:
    """The adapter's safetensors file is written first, then training_state.safetensors:
    write half of the second, then die."""
    save_file = safetensors.torch.save_file
    calls = []

    def half_then_kill(tensors, path, metadata=None):
        calls.append(path)
        save_file(tensors, path, metadata=metadata)
        if len(calls) == 2:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = half_then_kill


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-while-saving", type=int)
    args = parser.parse_args()
    train(args.out, resume=args.resume, kill_while_saving=args.kill_while_saving)
