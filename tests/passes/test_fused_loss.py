"""find_loss_head + the chunked head + cross-entropy (kernels/linear_cross_entropy.py): a causal
LM's training loss without full logits, equal to the unfused model's and PEFT's."""

import copy

import peft
import pytest
import torch
import transformers
from conftest import COMMON, VOCAB, tiny_model, token_batch

import lorafx
from lorafx.kernels import linear_cross_entropy


@pytest.fixture(autouse=True)
def three_rows_per_chunk(monkeypatch):
    """Several chunks on tiny shapes (the default chunk holds every row of a tiny batch)."""
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_BYTES", 3 * 4 * VOCAB)


def gemma2():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=5.0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def labels_for(ids):
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    return labels


def randomized(lm):
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(std=0.1)  # B = 0 would make every gradient but B's zero
    return lm.train()


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks for every call
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n.removeprefix("graph_module.").replace("base_model.model.", "").replace(".default", ""): p.grad
             for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(a, b, atol=1e-5):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("arch, targets, counts", [
    ("llama", ["q_proj"], {"head_nodes": 1, "row_inputs": 1, "whole_inputs": 1}),  # linear(hidden, W)
    ("llama", ["q_proj", "lm_head"], {"head_nodes": 4, "row_inputs": 2, "whole_inputs": 2}),  # + lora_B, scale, add
    ("gpt2", ["c_attn"], {"head_nodes": 1, "row_inputs": 1, "whole_inputs": 1}),  # tied to wte
])
def test_find_loss_head_counts(arch, targets, counts):
    lm = lorafx.transform(tiny_model(arch), lorafx.LoraSpec(r=4, targets=targets))
    assert next(r for r in lm.pass_results if r.name == "find_loss_head").counts == counts


@pytest.mark.parametrize("arch, targets", [
    ("llama", ["q_proj", "v_proj"]), ("llama", ["q_proj", "lm_head"]),
    ("gpt2", ["c_attn"]), ("gpt2", ["c_attn", "lm_head"]),  # GPT-2's head is tied to the embeddings
])
@pytest.mark.parametrize("num_items", [None, 9])
def test_chunked_loss_equals_unfused_and_peft(arch, targets, num_items):
    model = tiny_model(arch)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                             fan_in_fan_out=arch == "gpt2")
    peft_model = peft.get_peft_model(copy.deepcopy(model), config).train()
    lm = lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=8, targets=targets)).train()
    state = peft.get_peft_model_state_dict(peft_model)
    with torch.no_grad():
        for name, p in lm.named_lora_parameters():
            p.copy_(state["base_model.model." + name])
    ids = token_batch()
    n = None if num_items is None else torch.tensor(num_items)
    chunked = loss_and_grads(lm, ids, labels_for(ids), num_items_in_batch=n)
    assert chunked[0].logits is None and list(chunked[0].keys()) == ["loss"]
    assert_same(chunked, loss_and_grads(lm, ids, labels_for(ids), num_items_in_batch=n, return_logits=True))
    assert_same(chunked, loss_and_grads(peft_model, ids, labels_for(ids), num_items_in_batch=n))


@pytest.mark.parametrize("case", ["dropout", "modules_to_save", "dora", "softcap", "ia3"])
def test_head_variants_equal_unfused(case):
    """LoRA dropout on lm_head (drawn in the body, same masks), lm_head trained in full (its
    weight's gradient through the chunks), DoRA on lm_head, Gemma 2's logit soft-capping, (IA)³."""
    model = gemma2() if case == "softcap" else tiny_model("llama")
    spec = {
        "dropout": lorafx.LoraSpec(r=4, targets=["q_proj", "lm_head"], dropout=0.1),
        "modules_to_save": lorafx.LoraSpec(r=4, targets=["q_proj"], modules_to_save=["lm_head"]),
        "dora": lorafx.LoraSpec(r=4, targets=["q_proj", "lm_head"], use_dora=True),
        "softcap": lorafx.LoraSpec(r=4, targets=["q_proj", "lm_head"]),
        "ia3": lorafx.IA3Spec(targets=["v_proj", "down_proj", "lm_head"], feedforward=["down_proj"]),
    }[case]
    lm = randomized(lorafx.transform(model, spec))
    assert next(r for r in lm.pass_results if r.name == "find_loss_head").counts["head_nodes"] > 0
    ids = token_batch()
    chunked = loss_and_grads(lm, ids, labels_for(ids))
    assert chunked[0].logits is None
    unfused = loss_and_grads(lm, ids, labels_for(ids), return_logits=True)
    assert_same(chunked, unfused)
    if case == "modules_to_save":
        assert "lm_head.weight" in chunked[1]


def test_logits_when_asked_for_or_not_training():
    """Trainer reads outputs.loss in training; its prediction_step (eval mode, no_grad) and
    return_logits=True / chunked_loss=False get the model's full logits."""
    base = tiny_model("llama")
    ids = token_batch()
    with torch.no_grad():
        ref = base(input_ids=ids, labels=labels_for(ids))
    lm = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4)).train()
    assert lm(ids, labels=labels_for(ids)).logits is None
    for out in (lm(ids, labels=labels_for(ids), return_logits=True), lm.eval()(ids, labels=labels_for(ids))):
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
    lm.train()
    with torch.no_grad():
        assert lm(ids, labels=labels_for(ids)).logits is not None
    full = lorafx.transform(copy.deepcopy(base), lorafx.LoraSpec(r=4, chunked_loss=False)).train()
    assert full(ids, labels=labels_for(ids)).logits is not None
    with pytest.raises(ValueError, match="LoraSpec.chunked_loss='yes' is invalid: allowed is True or False"):
        lorafx.LoraSpec(chunked_loss="yes")


def test_bfloat16_close_to_unfused():
    lm = randomized(lorafx.transform(tiny_model("llama").to(torch.bfloat16), lorafx.LoraSpec(r=4, targets=["q_proj", "lm_head"])))
    ids = token_batch()
    chunked = loss_and_grads(lm, ids, labels_for(ids))
    unfused = loss_and_grads(lm, ids, labels_for(ids), return_logits=True)
    assert chunked[0].loss.dtype == unfused[0].loss.dtype == torch.float32
    assert_same(chunked, unfused, atol=2e-2)


def test_no_label_left_is_nan_as_unfused():
    lm = randomized(lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4)))
    ids = token_batch()
    out = lm(ids, labels=torch.full_like(ids, -100))
    assert out.logits is None and torch.isnan(out.loss)
    assert torch.isnan(lm(ids, labels=torch.full_like(ids, -100), return_logits=True).loss)


def test_bad_labels_refused_before_any_gradient():
    lm = randomized(lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4)))
    ids = token_batch()
    bad = ids.clone()
    bad[1, 4] = VOCAB + 5
    with pytest.raises(IndexError, match=f"labels holds {VOCAB + 5}: allowed are 0..{VOCAB - 1} and -100"):
        lm(ids, labels=bad)
    with pytest.raises(IndexError):  # the unfused loss refuses it too (torch's message)
        lm(ids, labels=bad, return_logits=True)
    bad[1, 4] = -5  # only -100 is ignored
    with pytest.raises(IndexError, match="labels holds -5: allowed are"):
        lm(ids, labels=bad)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 6\); LlamaForCausalLM expects \(2, 7\)"):
        lm(ids, labels=ids[:, :6])
    assert all(p.grad is None for p in lm.trainable_parameters())
