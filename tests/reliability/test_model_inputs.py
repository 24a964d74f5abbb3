"""The model and its inputs, merge and training checkpoints (issue 16): each case gets the peer's
result or an error that names the problem, and nothing the user had changes.

Merge
  1 LoRA on a tied lm_head (GPT-2; a Llama with tie_word_embeddings=True): merge() and
    merge_and_unload() keep the trained logits (lm_head gets its own merged weight, the input
    embeddings stay as they were, config.tie_word_embeddings becomes False); the saved model
    reloads with transformers to the same logits, and equals PEFT's merge of the untied model
    (PEFT's recipe; PEFT's merge of the tied model changes the embeddings and only warns).
"""

import warnings

import peft
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
