"""transform() on real tiny HF decoders: identity at init, PEFT parameter counts, dynamic shapes,
train/eval, training, merge."""

import copy

import peft
import pytest
import torch
from conftest import MLP, tiny_model, token_batch

import lorafx

SPEC = lorafx.LoraSpec(r=4, alpha=8)


def peft_config(spec, **extra):
    return peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           target_modules="all-linear", use_rslora=spec.use_rslora, **extra)


def test_identity_at_init_counts_and_dynamic_shapes(arch):
    model = tiny_model(arch)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(SPEC))
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    lm = lorafx.transform(model, SPEC).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    assert lorafx.count_parameters(lm) == peft_model.get_nb_trainable_parameters()
    insert = next(r for r in lm.pass_results if r.name == "insert_lora")
    assert insert.counts["lora"] == insert.counts["linear"] - 1  # every linear but lm_head
    # Other batch and sequence lengths run on the same graph (no re-capture).
    graph = lm.graph_module
    for batch, seq in [(1, 1), (3, 11)]:
        ids = token_batch(batch, seq, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(lm(ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert lm.graph_module is graph


def test_same_output_type_and_hf_loss():
    model = tiny_model("llama")
    ids = token_batch()
    lm = lorafx.transform(model, SPEC).eval()
    out, ref = lm(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    assert type(out) is type(ref)
    assert list(out.keys())[0] == "loss"
    torch.testing.assert_close(out.loss, ref.loss)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    torch.testing.assert_close(lm(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_bad_inputs_at_call_time():
    lm = lorafx.transform(tiny_model("llama"), SPEC)
    with pytest.raises(TypeError, match="unsupported inputs \\['inputs_embeds'\\]"):
        lm(token_batch(), inputs_embeds=torch.zeros(2, 7, 32))
    with pytest.raises(TypeError, match="use_cache=True"):
        lm(token_batch(), use_cache=True)
    with pytest.raises(ValueError, match="batch and sequence length must be >= 1"):
        lm(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        lm(token_batch(), attention_mask=torch.ones(2, 3, dtype=torch.long))


def test_train_eval_switches_lora_and_model_dropout():
    model = tiny_model("gpt2", dropout=True)  # GPT-2 has resid/embd/attn dropout 0.1
    lm = lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=8, dropout=0.5))
    counts = lm.pass_results[0].counts
    assert counts["dropout"] > 0 and counts["attention"] == 2
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_()
    ids = token_batch()
    lm.eval()
    assert torch.equal(lm(ids).logits, lm(ids).logits)
    lm.train()
    assert not torch.equal(lm(ids).logits, lm(ids).logits)
    assert all(m.training for m in lm.modules())


def test_training_lowers_loss_and_changes_only_lora():
    model = tiny_model("qwen2")
    lm = lorafx.transform(model, lorafx.LoraSpec(r=8, alpha=16, dropout=0.05)).train()
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in lm.named_lora_parameters()}
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == {"graph_module." + n for n in lora}
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=3e-2)
    ids = token_batch(4, 16)
    losses = []
    for _ in range(25):
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2  # PEFT drops the same tiny model by ~0.3 here
    assert all(torch.equal(p, frozen[n]) for n, p in lm.named_parameters() if n in frozen)
    assert all(not torch.equal(p, lora[n]) for n, p in lm.named_lora_parameters() if "lora_B" in n)


def test_merge_equals_unmerged_and_peft_merge_and_unload(arch):
    model = tiny_model(arch)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(SPEC, init_lora_weights=False)).eval()
    lm = lorafx.transform(model, SPEC).eval()
    peft_state = peft.get_peft_model_state_dict(peft_model)
    with torch.no_grad():
        for name, p in lm.named_lora_parameters():
            p.copy_(peft_state["base_model.model." + name])
    ids = token_batch()
    merged = lm.merge()
    counts = merged.pass_results[-1].counts
    assert counts["modules"] == len(lm.lora_paths()) and counts["nodes_removed"] == 7 * counts["branches"]
    assert list(merged.named_lora_parameters()) == []
    assert not any(m for m in merged.modules() if type(m).__name__ in ("Identity", "Dropout"))
    with torch.no_grad():
        unmerged = lm(ids).logits
        torch.testing.assert_close(merged(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(peft_model.merge_and_unload()(input_ids=ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert len(list(lm.named_lora_parameters())) == 2 * len(lm.lora_paths())  # lm is left unmerged


def test_targets_matching_nothing_lists_linear_layers():
    with pytest.raises(lorafx.NoTargetError, match="model.layers.0.self_attn.q_proj"):
        lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(targets=["qkv"]))


def test_plain_module_with_example_inputs():
    torch.manual_seed(0)
    mlp = MLP()
    x = torch.randn(3, 8)
    with pytest.raises(lorafx.CaptureError, match="pass example inputs"):
        lorafx.transform(mlp, SPEC)
    lm = lorafx.transform(mlp, lorafx.LoraSpec(r=2, alpha=2, targets=["up"]), example_args=(x,))
    assert [n for n, _ in lm.named_lora_parameters()] == ["up.lora_A.weight", "up.lora_B.weight"]
    torch.testing.assert_close(lm(x), mlp(x))
    torch.testing.assert_close(lm(torch.randn(5, 8)).shape, torch.Size([5, 4]))


def test_capture_error_names_the_model():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be captured
                return self.lin(x)
            return x

    with pytest.raises(lorafx.CaptureError, match="could not capture Branchy"):
        lorafx.transform(Branchy(), SPEC, example_args=(torch.randn(2, 4),))


def test_print_trainable_parameters_matches_peft_line(capsys):
    model = tiny_model("mistral")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config(SPEC))
    peft_model.print_trainable_parameters()
    theirs = capsys.readouterr().out
    lorafx.print_trainable_parameters(lorafx.transform(model, SPEC))
    assert capsys.readouterr().out == theirs


def test_state_dict_round_trip():
    lm = lorafx.transform(tiny_model("llama"), SPEC).eval()
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_()
    state = lm.state_dict()
    assert "graph_module.model.layers.0.self_attn.q_proj.lora_B.weight" in state
    other = lorafx.transform(tiny_model("llama", seed=1), SPEC).eval()
    other.load_state_dict(state)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, lm(ids).logits, rtol=0, atol=0)
