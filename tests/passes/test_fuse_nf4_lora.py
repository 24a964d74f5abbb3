"""fuse_nf4_lora / unfuse_nf4_lora on transformed tiny HF models (CPU: the fused ops run their
torch reference, so fused and unfused graphs must agree to rounding)."""

import copy

import pytest
import torch
from conftest import tiny_model, token_batch

import lorafx
from lorafx.passes.common import LORA, aten
from lorafx.passes.fuse_nf4_lora import LORA_LINEAR, NF4_DEQUANT, NF4_LORA_LINEAR, fuse_nf4_lora, unfuse_nf4_lora


def transformed(arch="llama", **spec):
    """A transformed tiny model with non-zero B (so the LoRA branch contributes)."""
    lm = lorafx.transform(tiny_model(arch), lorafx.LoraSpec(r=4, alpha=8, **spec))
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(p.numel()))
    return lm


def logits_and_lora_grads(lm, ids):
    """One seeded training step's logits and LoRA gradients (seeded: dropout draws the same masks)."""
    lm.train()
    lm.zero_grad()
    torch.manual_seed(0)
    out = lm(ids, labels=ids, return_logits=True)  # a training call's default loss is chunked, without logits
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in lm.named_lora_parameters()}


def assert_same_training_step(fused, unfused):
    ids = token_batch()
    (logits, grads), (ref_logits, ref_grads) = logits_and_lora_grads(fused, ids), logits_and_lora_grads(unfused, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module")
def qlora_with_dropout():
    return transformed(quantize="nf4", dropout=0.1)


def test_qlora_layers_become_one_node_each_and_train_identically(qlora_with_dropout):
    unfused = qlora_with_dropout
    fused = copy.deepcopy(unfused)
    result = fuse_nf4_lora(fused.graph_module)
    assert result.counts == {"lora": 0, "nf4_lora": 14, "nf4": 0, "skipped": 0}  # 7 per layer; lm_head stays 16-bit
    gm = fused.graph_module
    assert targets(gm).count(NF4_LORA_LINEAR) == 14 and NF4_DEQUANT not in targets(gm)
    assert [n for n in gm.graph.nodes if n.meta.get(LORA, ("", ""))[1] in ("down", "up", "scale", "add")] == []
    fused_node = next(n for n in gm.graph.nodes if n.target == NF4_LORA_LINEAR)
    assert fused_node.meta[LORA] == ("model.layers.0.self_attn.q_proj", "fused")
    # The dropout module stays in the graph as the op's x_lora, so it follows train()/eval().
    x_lora = fused_node.args[-1]
    assert x_lora.op == "call_module" and x_lora.target == "model.layers.0.self_attn.q_proj.lora_dropout"
    assert fused.lora_paths() == unfused.lora_paths()
    assert_same_training_step(fused, unfused)
    fused.eval()
    unfused.eval()
    with torch.no_grad():
        ids = token_batch(seed=3)
        torch.testing.assert_close(fused(ids).logits, unfused(ids).logits, rtol=0, atol=1e-5)


def test_16bit_layers_fuse_to_lora_linear_and_identity_dropout_disappears():
    unfused = transformed()
    fused = copy.deepcopy(unfused)
    assert fuse_nf4_lora(fused.graph_module).counts == {"lora": 14, "nf4_lora": 0, "nf4": 0, "skipped": 0}
    gm = fused.graph_module
    assert targets(gm).count(LORA_LINEAR) == 14
    assert not any(n.op == "call_module" and n.target.endswith("lora_dropout") for n in gm.graph.nodes)
    assert all(n.args[-1] is None for n in gm.graph.nodes if n.target == LORA_LINEAR)  # the op reads x
    assert targets(gm).count(aten.linear.default) == 1  # lm_head, which has no LoRA
    assert_same_training_step(fused, unfused)


def test_nf4_layers_without_lora_fuse_too():
    unfused = transformed(quantize="nf4", targets=["q_proj"])
    fused = copy.deepcopy(unfused)
    assert fuse_nf4_lora(fused.graph_module).counts == {"lora": 0, "nf4_lora": 2, "nf4": 12, "skipped": 0}
    plain = [n for n in fused.graph_module.graph.nodes if n.target == NF4_LORA_LINEAR and n.args[9] is None]
    assert len(plain) == 12 and all(LORA not in n.meta for n in plain)
    assert_same_training_step(fused, unfused)
    assert unfuse_nf4_lora(fused.graph_module).counts == {"lora": 0, "nf4_lora": 2, "nf4": 12}
    assert targets(fused.graph_module).count(NF4_DEQUANT) == 14
    assert_same_training_step(fused, unfused)


def test_conv1d_and_dora_layers_are_left_unfused_and_counted():
    gpt2 = transformed("gpt2")
    assert fuse_nf4_lora(gpt2.graph_module).counts == {"lora": 0, "nf4_lora": 0, "nf4": 0, "skipped": 8}
    assert aten.addmm.default in targets(gpt2.graph_module)
    dora = transformed(targets=["q_proj", "v_proj"], use_dora=True)
    before = list(dora.graph_module.graph.nodes)
    assert fuse_nf4_lora(dora.graph_module).counts == {"lora": 0, "nf4_lora": 0, "nf4": 0, "skipped": 4}
    assert list(dora.graph_module.graph.nodes) == before


def test_unfuse_restores_the_branch_so_merge_gives_the_same_model(qlora_with_dropout):
    unfused = qlora_with_dropout
    fused = copy.deepcopy(unfused)
    fuse_nf4_lora(fused.graph_module)
    assert unfuse_nf4_lora(fused.graph_module).counts == {"lora": 0, "nf4_lora": 14, "nf4": 0}
    assert LORA_LINEAR not in targets(fused.graph_module) and NF4_LORA_LINEAR not in targets(fused.graph_module)
    roles = sorted(n.meta[LORA][1] for n in fused.graph_module.graph.nodes if LORA in n.meta)
    assert roles == sorted(n.meta[LORA][1] for n in unfused.graph_module.graph.nodes if LORA in n.meta)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fused.merge().eval()(ids).logits, unfused.merge().eval()(ids).logits)


def test_fuses_the_graph_dynamo_hands_a_compile_backend():
    """No lorafx tags there, weights are placeholders and the LoRA dropout is an inlined F.dropout."""
    lm = transformed(quantize="nf4", dropout=0.1, targets=["q_proj", "down_proj"])
    results = []

    def backend(gm, example_inputs):
        results.append(fuse_nf4_lora(gm).counts)
        return gm.forward

    compiled = torch.compile(lm, backend=backend)
    ids = token_batch()
    lm.train()
    torch.manual_seed(0)
    out = compiled(ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in lm.named_lora_parameters()}
    assert results == [{"lora": 0, "nf4_lora": 4, "nf4": 10, "skipped": 0}]
    ref_logits, ref_grads = logits_and_lora_grads(lm, ids)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gpu_fused_model_runs_the_triton_kernels_and_trains_like_the_unfused_one(quantize):
    """On CUDA the fused ops are the Triton kernels (NF4 computes in bfloat16 there)."""
    lm = lorafx.transform(tiny_model("llama").cuda(), lorafx.LoraSpec(r=4, alpha=8, quantize=quantize, dropout=0.1))
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(std=0.1)
    fused = copy.deepcopy(lm)
    counts = fuse_nf4_lora(fused.graph_module).counts
    assert counts["nf4_lora" if quantize else "lora"] == 14
    ids = token_batch().cuda()
    (logits, grads), (ref_logits, ref_grads) = logits_and_lora_grads(fused, ids), logits_and_lora_grads(lm, ids)
    tol = dict(atol=6e-2, rtol=2e-2) if quantize else dict(atol=1e-4, rtol=1e-4)  # bf16 vs fp32 compute
    torch.testing.assert_close(logits, ref_logits, **tol)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")
