"""Output head + cross-entropy, a chunk of token rows at a time, never holding all the logits.

    loss = Σ_rows (logsumexp(head(x)_row) - head(x)_row[target]) / denominator

The reference is transformers' ForCausalLMLoss on the full logits (tests compare against the
unfused model). As in Liger-Kernel's fused_linear_cross_entropy, the gradients are computed
in the forward, chunk by chunk — (softmax - onehot) / denominator back through the head —
and the backward only scales them by the incoming gradient: one pass over the vocab matmul
instead of a forward plus a recomputation. Unlike Liger (and like Apple's Cut Cross-Entropy,
which also skips ignored tokens), the head is any row-wise graph (lorafx/passes/loss_head.py:
LoRA on lm_head, soft-capping), run through autograd per chunk, so there is no Triton kernel:
the matmuls are the head's own ops.
"""

from __future__ import annotations

import torch

# Chunk size: the rows whose float32 logits take about this much. Each chunk holds ~3 such
# buffers (logits, softmax/gradient, a 16-bit copy). 64 MiB is 130 rows at vocab 128256: in
# bench/bench_loss_memory.py (hidden 256, seq 2048) the step peaks at 0.10x PEFT's memory and
# takes about the unfused step's time (6.2 s vs 5.5 s, one loaded run; no sweep of this value yet).
CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, head, targets, denominator, rows_per_chunk, n_rows, *tensors):
        rows, whole = tensors[:n_rows], tensors[n_rows:]
        wants = [t.requires_grad for t in tensors]
        grads = [torch.zeros_like(t) if w else None for t, w in zip(tensors, wants)]
        total = torch.zeros((), dtype=torch.float32, device=targets.device)
        inverse = 1 / torch.as_tensor(denominator, dtype=torch.float32, device=targets.device)
        for start in range(0, targets.shape[0], rows_per_chunk):
            chunk = slice(start, start + rows_per_chunk)
            target = targets[chunk]
            with torch.enable_grad():
                inputs = [x[chunk].detach().requires_grad_(w).unsqueeze(0) for x, w in zip(rows, wants)]
                inputs += [t.detach().requires_grad_(w) for t, w in zip(whole, wants[n_rows:])]
                logits = head(*inputs)
            logits32 = logits.detach().float().reshape(target.shape[0], -1)  # as ForCausalLMLoss upcasts
            # As cross_entropy = nll_loss(log_softmax): its gradient (softmax - onehot) / denominator
            # comes out with the same roundings, so optimizers like Adam see the unfused gradients.
            log_probs = torch.log_softmax(logits32, dim=-1)
            del logits32
            total -= log_probs.gather(1, target[:, None]).sum()
            differentiable = [(i, x) for i, x in enumerate(inputs) if wants[i]]
            if not differentiable:
                continue
            grad = log_probs.exp_().mul_(inverse)
            grad[torch.arange(target.shape[0], device=grad.device), target] -= inverse
            grad = grad.to(logits.dtype).view_as(logits)
            parts = torch.autograd.grad(logits, [x for _, x in differentiable], grad)
            for (i, _), part in zip(differentiable, parts):
                if i < n_rows:
                    grads[i][chunk] += part.squeeze(0)
                else:
                    grads[i] += part
        ctx.grads = grads
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        return (None, None, None, None, None, *[g * grad_output.to(g.dtype) if g is not None else None for g in grads])


def head_cross_entropy(head, rows: list[torch.Tensor], whole: list[torch.Tensor], targets: torch.Tensor,
                       denominator, vocab: int, rows_per_chunk: int | None = None) -> torch.Tensor:
    """Σ cross_entropy(head(rows, whole), targets) / denominator, chunk by chunk.

    head: a module taking (*row_chunks, *whole) with row chunks shaped (1, n, features) and
    returning (1, n, vocab) logits. rows: (N, features) tensors; targets: (N,) class indices
    (drop ignored rows first); denominator: a number or 0-d tensor. Gradients reach every
    input that requires them."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        bad = int(targets.min()) if int(targets.min()) < 0 else int(targets.max())
        raise IndexError(f"labels holds {bad}: allowed are 0..{vocab - 1} and -100 (ignored)")
    return _HeadCrossEntropy.apply(head, targets, denominator, rows_per_chunk or chunk_rows(vocab), len(rows), *rows, *whole)
