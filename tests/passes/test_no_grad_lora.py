"""no_grad_lora: no-grad calls run each plain LoRA layer folded (W + scale·B·A, kept while W, A, B
are unchanged) or with the branch summed into the base output by one addmm. Logits equal PEFT's
either way, grad-enabled calls keep insert_lora's graph and PEFT's gradients, the layers where
the formulation differs are left alone, and the folded weights follow every change to the store
(optimizer step, load_adapter, set_adapter, merge, .to) and the memory budget."""

import copy
import itertools

import peft
import pytest
import torch
from conftest import tiny_model, token_batch

import lorafx
from lorafx.core.model import _deepcopy
from lorafx.passes import no_grad_lora
from lorafx.passes.no_grad_lora import NoGradLoraLinear
from lorafx.passes.common import LORA

SPEC = lorafx.LoraSpec(r=4, alpha=8, targets="all-linear")
TOL = dict(rtol=1e-5, atol=1e-5)


def peft_pair(arch, spec=SPEC, **extra):
    """A lorafx model and a PEFT model of the same tiny model with the same random adapter."""
    model = tiny_model(arch)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules="all-linear",
                             init_lora_weights=False, use_dora=spec.use_dora, **extra)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    lm = lorafx.transform(model, spec)
    state = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for name, p in lm.named_lora_parameters():
            p.copy_(state["base_model.model." + name])
    return lm, theirs


def no_grad_graph(lm):
    with torch.no_grad():
        lm(token_batch(1, 2))
    return lm._views.get("no_grad")


def layers(view):
    return [m for m in view.modules() if isinstance(m, NoGradLoraLinear)]


def folds(lm):
    return [m.folds for m in layers(lm._views["no_grad"])]


def rewritten_copy(lm):
    g = lm.graph_module
    view = _deepcopy(g, {id(t): t for t in itertools.chain(g.parameters(), g.buffers())})
    return view, no_grad_lora(view).counts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_grad_logits_equal_peft_and_grads_stay_peft(arch):
    lm, theirs = peft_pair(arch)
    lm.eval(), theirs.eval()
    ids = token_batch(3, 9)
    n = len(lm.lora_paths())
    assert rewritten_copy(lm)[1] == {"branches": n, "rewritten": n, "foldable": n}
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(lm(ids).logits, expected, **TOL)  # folded: 27 tokens pay back W'
        assert folds(lm) == [1] * n
        lm.merged_weights_budget = 0  # never fold: every layer accumulates
        torch.testing.assert_close(lm(ids).logits, expected, **TOL)
        assert folds(lm) == [0] * n
    assert lm._views["no_grad"] is not lm.graph_module
    assert not any(isinstance(m, NoGradLoraLinear) for m in lm.graph_module.modules())
    # Grad-enabled calls run insert_lora's graph: PEFT's gradients.
    lm.train(), theirs.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    for name, p in lm.named_lora_parameters():
        torch.testing.assert_close(p.grad, grads[f"base_model.model.{name[:-len('.weight')]}.default.weight"], **TOL)


def test_only_plain_branches_are_rewritten():
    """DoRA and 16-bit layers (with float32 or 16-bit LoRA) sum differently (PEFT's DoRA term,
    PEFT's float32 add, PEFT's 16-bit roundings): left as they are, and with nothing to rewrite
    no-grad calls use graph_module itself."""
    dora, _ = peft_pair("llama", lorafx.LoraSpec(r=4, alpha=8, targets="all-linear", use_dora=True))
    assert rewritten_copy(dora)[1] == {"branches": len(dora.lora_paths()), "rewritten": 0, "foldable": 0}
    assert no_grad_graph(dora.eval()) is dora.graph_module
    bf16 = lorafx.transform(tiny_model("llama").to(torch.bfloat16), SPEC)
    assert rewritten_copy(bf16)[1]["rewritten"] == 0
    roles = {n.meta[LORA][1] for n in bf16.graph_module.graph.nodes if LORA in n.meta}
    assert {"cast_in", "cast_out"} <= roles
    spec = lorafx.LoraSpec(r=4, alpha=8, targets="all-linear", autocast_adapter_dtype=False)
    bf16_lora = lorafx.transform(tiny_model("llama").to(torch.bfloat16), spec)
    assert rewritten_copy(bf16_lora)[1]["rewritten"] == 0
    assert no_grad_graph(bf16_lora) is bf16_lora.graph_module


@pytest.mark.parametrize("spec", [
    lorafx.LoraSpec(r=4, alpha=8, targets="all-linear", quantize="nf4"),
    lorafx.LoraSpec(r=4, alpha=8, targets="all-linear", dropout=0.3),
    lorafx.LoraSpec(r=4, alpha=8, targets="all-linear", checkpoint="layer"),
], ids=["nf4", "dropout", "checkpoint"])
def test_no_grad_equals_grad_enabled_call(spec):
    """NF4 bases, LoRA dropout (in train mode: the same masks from the same seed) and
    checkpointed layers: the no-grad graph computes what the training graph computes."""
    lm = lorafx.transform(tiny_model("qwen2"), spec).train()
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(0, 0.2)
    ids = token_batch(2, 16)  # 32 tokens: every layer's W' pays back
    torch.manual_seed(3)
    expected = lm(ids).logits.detach()
    torch.manual_seed(3)
    with torch.no_grad():
        got = lm(ids).logits
    assert len(layers(lm._views["no_grad"])) == len(lm.lora_paths())
    # NF4 weights are dequantized per call and dropout masks the LoRA input: both accumulate.
    assert folds(lm) == [0 if spec.quantize or spec.dropout else 1] * len(lm.lora_paths())
    torch.testing.assert_close(got, expected, **TOL)


def test_no_grad_graph_follows_optimizer_steps_load_adapter_and_merge(tmp_path):
    lm, theirs = peft_pair("llama")
    ids = token_batch(2, 16)
    mask = torch.ones_like(ids)
    view = no_grad_graph(lm)
    n = len(lm.lora_paths())
    with torch.no_grad():
        lm(ids)
    assert folds(lm) == [1] * n  # the 2-token call above folded nothing: it would not pay back W'
    opt = torch.optim.SGD(lm.trainable_parameters(), lr=0.5)
    for step in range(2):
        lm(input_ids=ids, labels=ids).loss.backward()
        assert lm.merged_weights_used == 0  # a training call holds no folded weights
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(lm(ids).logits, lm.graph_module(input_ids=ids, attention_mask=mask)["logits"], **TOL)
            lm(ids)
        assert folds(lm) == [2 + step] * n  # once per step: the next call reuses it
    assert lm._views["no_grad"] is view  # the same graph, reading the updated tensors
    theirs.save_pretrained(tmp_path)
    lm.load_adapter(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, theirs(input_ids=ids).logits, **TOL)
        assert folds(lm) == [4] * n
        lm(token_batch(1, 1))  # a decode-sized call reads the folded weights it finds
        assert folds(lm) == [4] * n
        merged = lm.merge()
        assert merged._views == {} and no_grad_graph(merged) is merged.graph_module
        torch.testing.assert_close(merged(ids).logits, theirs(input_ids=ids).logits, **TOL)
    lm.to("cpu")  # .to() may move the store's tensors: every view is dropped and rebuilt
    assert "no_grad" not in lm._views
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, theirs(input_ids=ids).logits, **TOL)
    assert lm._views["no_grad"] is not view


def test_named_adapters_use_the_bank_graph(tmp_path):
    """set_adapter and adapter_ids read the banks' ids buffer in graph_module: no-grad calls run it."""
    lm, theirs = peft_pair("llama")
    ids = token_batch(2, 6)
    no_grad_graph(lm)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path)
    lm.load_adapter(tmp_path, name="other")
    lm.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, theirs(input_ids=ids).logits, **TOL)
    assert "no_grad" not in lm._views
    lm.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, lm(ids, adapter_ids=["default", "default"]).logits)
        with theirs.disable_adapter():
            base = theirs(input_ids=ids).logits
        torch.testing.assert_close(lm(ids, adapter_ids=[-1, -1]).logits, base, **TOL)


def test_merged_weights_budget_bounds_the_folded_bytes():
    lm, theirs = peft_pair("llama")
    ids = token_batch(2, 16)
    sizes = {p: lm.graph_module.get_submodule(p).weight.nbytes for p in lm.lora_paths()}
    lm.merged_weights_budget = sizes["model.layers.0.self_attn.q_proj"] + 1
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, theirs(input_ids=ids).logits, **TOL)
    assert folds(lm) == [1] + [0] * (len(sizes) - 1)  # the first layer in graph order fits, no other
    assert lm.merged_weights_used == sizes["model.layers.0.self_attn.q_proj"]
    lm.merged_weights_budget = None
    assert "no_grad" not in lm._views  # the folded weights held went with the old graph
    with torch.no_grad():
        lm(ids)
    assert lm.merged_weights_used == sum(sizes.values())
    for bad in (-1, 1.5, True, "1GiB"):
        with pytest.raises(ValueError, match=f"merged_weights_budget={bad!r} is invalid: allowed is a byte count"):
            lm.merged_weights_budget = bad
