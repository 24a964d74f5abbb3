import pytest
import torch
from conftest import tiny_model, token_batch

import lorafx
from lorafx.passes.common import LINEAR
from lorafx.passes.quantize_nf4 import STORAGE


def nf4_nodes(gm):
    return [n for n in gm.graph.nodes if n.target == torch.ops.lorafx.nf4_dequant.default]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_qlora_close_to_fp32_trains_and_saves(arch, tmp_path):
    model = tiny_model(arch)
    ids = token_batch(4, 16)
    with torch.no_grad():
        expected = model(ids).logits
    lm = lorafx.transform(model, lorafx.LoraSpec(r=8, alpha=16, quantize="nf4")).eval()
    counts = next(r for r in lm.pass_results if r.name == "quantize_nf4").counts
    n_linear = len(lm.linear_sites())
    assert counts == {"quantized": n_linear - 1, "loaded": 0, "skipped": 1}  # lm_head stays full precision
    assert len(nf4_nodes(lm.graph_module)) == n_linear - 1
    params = dict(lm.graph_module.named_parameters())
    quantized = [path for path in lm.linear_sites() if path != "lm_head"]
    assert not any(f"{path}.weight" in params for path in quantized)  # full-precision copies are gone
    with torch.no_grad():
        got = lm(ids).logits
    rel = ((got - expected).norm() / expected.norm()).item()
    print(f"{arch}: NF4 logits relative error {rel:.4f}")
    assert rel < 0.15  # 4-bit on a random 32-wide model; bitsandbytes gives the same (see test_loading)
    lm.train()
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        storage_grads = [b.grad for m in lm.modules() if type(m).__name__ == "NF4Storage" for b in m.buffers()]
        assert all(g is None for g in storage_grads)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    lm.save_adapter(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_gradient_reaches_input_and_lora_only():
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(3, 64, requires_grad=True)
    lm = lorafx.transform(lin, lorafx.LoraSpec(r=2, quantize="nf4", init="gaussian"), example_args=(x.detach(),))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_()
    lm(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in lm.trainable_parameters())
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == [
        n for n, p in lm.named_parameters() if "lora_" in n
    ]


def test_compute_dtype_bf16_on_fp32_model_casts_like_linear4bit():
    model = tiny_model("llama")
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
    lm = lorafx.transform(model, lorafx.LoraSpec(r=4, quantize="nf4", compute_dtype=torch.bfloat16)).eval()
    site = next(n.meta[LINEAR] for n in lm.graph_module.graph.nodes if LINEAR in n.meta and "q_proj" in n.meta[LINEAR].path)
    assert site.dtype == torch.bfloat16
    assert dict(lm.named_lora_parameters())["model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.bfloat16
    with torch.no_grad():
        got = lm(ids).logits
    assert got.dtype == torch.float32
    assert ((got - expected).norm() / expected.norm()).item() < 0.15


def test_merge_of_nf4_model_gives_plain_weights():
    model = tiny_model("gpt2")
    lm = lorafx.transform(model, lorafx.LoraSpec(r=4, quantize="nf4")).eval()
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(0, 0.1)
    merged = lm.merge()
    ids = token_batch()
    assert nf4_nodes(merged.graph_module) == []
    assert not any(STORAGE in name for name, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)


def test_quantize_skip_and_blocksize():
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=2, quantize="nf4", blocksize=32,
                                                               quantize_skip=["lm_head", "down_proj"]))
    assert next(r for r in lm.pass_results if r.name == "quantize_nf4").counts == {"quantized": 12, "loaded": 0, "skipped": 3}
    storage = lm.graph_module.get_submodule(f"model.layers.0.self_attn.q_proj.{STORAGE}")
    assert storage.blocksize == 32


def test_blocksize_must_divide_the_weight():
    with pytest.raises(ValueError, match="multiple of blocksize=4096"):
        lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(quantize="nf4", blocksize=4096))


def test_tied_weight_is_refused_by_name():
    """GPT-2's lm_head is its token embedding: NF4 storage would untie them."""
    with pytest.raises(ValueError, match=r"lm_head.weight is tied \(transformer.wte.weight reads it too\)"):
        lorafx.transform(tiny_model("gpt2"), lorafx.LoraSpec(r=4, quantize="nf4", quantize_skip=[]))
