"""The model and its inputs, merge and training checkpoints (issue 16): each case gets the peer's
result or an error that names the problem, and nothing the user had changes.

Merge
  1 LoRA on a tied lm_head (GPT-2; a Llama with tie_word_embeddings=True): merge() and
    merge_and_unload() keep the trained logits (lm_head gets its own merged weight, the input
    embeddings stay as they were, config.tie_word_embeddings becomes False); the saved model
    reloads with transformers to the same logits, and equals PEFT's merge of the untied model
    (PEFT's recipe; PEFT's merge of the tied model changes the embeddings and only warns).
Inputs at call time (LoraModel.forward)
  2 int32 input_ids, 3 a bool attention_mask: taken, logits equal the HF model's
  4 token id >= vocab_size, 5 a negative token id: ValueError naming the id and vocab_size
  6 attention_mask given as a list: TypeError naming its type (transformers fails on it too)
  7 a sequence longer than max_position_embeddings (GPT-2): ValueError naming length and limit
Training checkpoints
  8 an optimizer moment of the wrong shape: CheckpointError naming the state, parameter and both
    shapes at load; model and optimizer unchanged
  9 step -5 / "5" in training_state.json: CheckpointError naming step
 10 save_checkpoint / load_checkpoint with optimizer=None: TypeError saying to use save_adapter;
    nothing written
NF4 transform
 11 transform of a model an NF4 transform already consumed: ValueError naming an emptied weight
 12 NF4 transform of a meta-device model: ValueError naming a meta weight and from_pretrained
"""

import json
import warnings

import peft
import safetensors.torch
import pytest
import torch
import transformers
from conftest import COMMON, tiny_model, token_batch

import lorafx


def tied_model(arch):
    if arch == "gpt2":
        return tiny_model("gpt2")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merge_of_lora_on_a_tied_lm_head_keeps_the_trained_model(arch, tmp_path):
    model = tied_model(arch)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    lm = lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=8, targets=["lm_head", "c_attn" if arch == "gpt2" else "q_proj"]))
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(0, 0.3)
    x = token_batch()
    trained = lm(x).logits.detach()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    with pytest.warns(UserWarning, match="tie_word_embeddings=False"):
        merged = lm.merge()
    torch.testing.assert_close(merged(x).logits, trained, atol=1e-4, rtol=1e-4)
    assert merged.pass_results[-1].counts["untied"] == 1 and not merged.config.tie_word_embeddings
    assert lm.config.tie_word_embeddings  # the unmerged model and the user's model keep theirs
    with pytest.warns(UserWarning, match="tie_word_embeddings=False"):
        unloaded = lm.merge_and_unload()
    assert unloaded.lm_head.weight is not unloaded.get_input_embeddings().weight
    torch.testing.assert_close(unloaded.get_input_embeddings().weight, embeddings, atol=0, rtol=0)
    torch.testing.assert_close(unloaded(x).logits, trained, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lm(x).logits, trained, atol=0, rtol=0)  # lm itself unchanged
    unloaded.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(reloaded(x).logits, trained, atol=1e-4, rtol=1e-4)

    # PEFT's own recipe for tied targets: untie (clone the embeddings into lm_head), then merge.
    lm.save_adapter(tmp_path / "adapter")
    untied = tied_model(arch)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.get_input_embeddings().weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notes for GPT-2's Conv1D
        oracle = peft.PeftModel.from_pretrained(untied, tmp_path / "adapter").merge_and_unload()
    torch.testing.assert_close(unloaded(x).logits, oracle(x).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    model = tiny_model(request.param)
    return model, lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=8, targets="all-linear"))


def test_int32_ids_and_a_bool_mask_are_taken_as_transformers_takes_them(pair):
    model, lm = pair
    x = token_batch()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :2] = False
    for kwargs in (dict(input_ids=x.int()), dict(input_ids=x, attention_mask=mask), dict(input_ids=x.int(), attention_mask=mask)):
        torch.testing.assert_close(lm(**kwargs).logits, model(**kwargs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [96, -3])
def test_a_token_id_outside_the_vocabulary_is_named(pair, bad):
    _, lm = pair
    x = token_batch()
    x[1, 4] = bad
    with pytest.raises(ValueError, match=rf"token id {bad}; the vocabulary has vocab_size=96"):
        lm(x)


def test_an_attention_mask_that_is_not_a_tensor_is_named(pair):
    _, lm = pair
    with pytest.raises(TypeError, match="attention_mask must be a tensor like input_ids, got list"):
        lm(token_batch(), attention_mask=[[1] * 7] * 2)


def test_a_sequence_longer_than_the_position_table_is_named():
    lm = lorafx.transform(tiny_model("gpt2"), lorafx.LoraSpec(r=4, alpha=8, targets=["c_attn"]))
    with pytest.raises(ValueError, match="input_ids has 65 tokens; GPT2LMHeadModel takes at most max_position_embeddings=64"):
        lm(torch.randint(3, 96, (1, 65)))
    assert lm(torch.randint(3, 96, (1, 64))).logits.shape == (1, 64, 96)


@pytest.fixture
def checkpoint(tmp_path):
    lm = lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
    lm(token_batch(), labels=token_batch()).loss.backward()
    opt.step()
    lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 1)
    return lm, opt, tmp_path / "ckpt"


def test_a_wrong_shape_optimizer_moment_is_named_at_load(checkpoint):
    lm, opt, folder = checkpoint
    path = folder / "training_state.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = next(k for k in sorted(tensors) if "exp_avg" in k)
    tensors[key] = torch.zeros(3, 5)
    safetensors.torch.save_file(tensors, path)
    before = ({n: p.detach().clone() for n, p in lm.named_lora_parameters()}, str(opt.state_dict()))
    with pytest.raises(lorafx.CheckpointError, match=r"optimizer state 'exp_avg\w*' of \S+ has shape \(3, 5\); the parameter has shape"):
        lorafx.load_checkpoint(folder, lm, opt)
    assert all(torch.equal(p, before[0][n]) for n, p in lm.named_lora_parameters())
    assert str(opt.state_dict()) == before[1]


@pytest.mark.parametrize("step", [-5, "5", True])
def test_a_bad_step_is_named(checkpoint, step):
    lm, opt, folder = checkpoint
    state = json.loads((folder / "training_state.json").read_text())
    (folder / "training_state.json").write_text(json.dumps({**state, "step": step}))
    with pytest.raises(lorafx.CheckpointError, match="field 'step' is"):
        lorafx.load_checkpoint(folder, lm, opt)


def test_a_checkpoint_needs_an_optimizer(checkpoint, tmp_path):
    lm, _, folder = checkpoint
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer .* got NoneType; .*save_adapter"):
        lorafx.save_checkpoint(tmp_path / "new", lm, None, 1)
    assert not (tmp_path / "new").exists()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        lorafx.load_checkpoint(folder, lm, None)


def test_a_model_an_nf4_transform_consumed_is_named():
    model = tiny_model("llama")
    first = lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj"], quantize="nf4"))
    for spec in (first.spec, lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj"])):
        with pytest.raises(ValueError, match=r"already transformed with quantize='nf4'.*q_proj.weight and \d+ more are empty"):
            lorafx.transform(model, spec)
    assert first(token_batch()).logits.isfinite().all()  # the first result still runs


def test_an_nf4_transform_of_a_meta_model_is_named():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match=r"on the meta device \(model.embed_tokens.weight and \d+ more\).*lorafx.from_pretrained"):
        lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj"], quantize="nf4"))


@pytest.mark.parametrize("variant", ["ia3", "vera"])
def test_ia3_and_vera_merges_of_a_tied_lm_head_keep_the_embeddings(variant):
    model = tied_model("llama")
    spec = (lorafx.IA3Spec(targets=["lm_head", "q_proj"], feedforward=[]) if variant == "ia3"
            else lorafx.VeraSpec(r=4, targets=["lm_head", "q_proj"]))
    lm = lorafx.transform(model, spec)
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.uniform_(0.5, 1.5)
    x = token_batch()
    trained = lm(x).logits.detach()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    with pytest.warns(UserWarning, match="tie_word_embeddings=False"):
        unloaded = lm.merge_and_unload()
    assert unloaded.lm_head.weight is not unloaded.get_input_embeddings().weight
    torch.testing.assert_close(unloaded.get_input_embeddings().weight, embeddings, atol=0, rtol=0)
    torch.testing.assert_close(model.get_input_embeddings().weight, embeddings, atol=0, rtol=0)
    torch.testing.assert_close(unloaded(x).logits, trained, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lm(x).logits, trained, atol=0, rtol=0)
