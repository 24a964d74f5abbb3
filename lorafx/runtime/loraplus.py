"""LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A, which speeds up and
stabilises LoRA training on wide models. The groups match PEFT's create_loraplus_optimizer
for LoRA parameters."""

from __future__ import annotations


def loraplus_param_groups(lm, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: A's at `lr`, B's at `lr * ratio`."""
    if not lr > 0 or not ratio > 0:
        raise ValueError(f"need lr > 0 and ratio > 0, got lr={lr!r}, ratio={ratio!r}")
    params = dict(lm.named_lora_parameters())
    a = [p for n, p in params.items() if ".lora_A." in n and p.requires_grad]
    b = [p for n, p in params.items() if ".lora_B." in n and p.requires_grad]
    return [
        {"params": a, "lr": lr, "weight_decay": weight_decay},
        {"params": b, "lr": lr * ratio, "weight_decay": weight_decay},
    ]
