"""forward(position_ids=...): packed sequences and explicit positions, PEFT (use_cache=False) as the oracle."""

import peft
import pytest
import torch
from conftest import tiny_model, token_batch

import lorafx

PACKED = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 0, 1, 2]])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_position_ids_logits_loss_and_grads_equal_peft(tmp_path, arch):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_model(arch), config)
    theirs.save_pretrained(tmp_path)
    lm = lorafx.transform(tiny_model(arch), lorafx.LoraSpec.from_peft_config(tmp_path))
    lm.load_adapter(tmp_path)
    ids = token_batch(2, 9)
    # Packed documents (no attention_mask): each token attends to its own document only.
    ours = lm(ids, position_ids=PACKED, labels=ids)
    expected = theirs(input_ids=ids, position_ids=PACKED, labels=ids, use_cache=False)
    torch.testing.assert_close(ours.logits, expected.logits, rtol=1e-5, atol=1e-5)
    ours.loss.backward()
    expected.loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in lm.named_lora_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        alone = lm(ids[:1, 4:7]).logits  # the second document of row 0, on its own
        torch.testing.assert_close(ours.logits[0, 4:7], alone[0], rtol=1e-5, atol=1e-5)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding with positions counting real tokens only
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        got = lm(ids, attention_mask=mask, position_ids=positions).logits
        want = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
        with lm.disable_adapters(), theirs.disable_adapter():
            base = theirs(input_ids=ids, position_ids=PACKED, use_cache=False).logits
            torch.testing.assert_close(lm(ids, position_ids=PACKED).logits, base, rtol=1e-5, atol=1e-5)
    views = {id(t) for v in lm._views.values() for t in v.parameters()}
    assert views <= {id(p) for p in lm.parameters()}  # the position graphs hold the store's tensors


def test_bad_position_ids_are_named():
    lm = lorafx.transform(tiny_model("gpt2"), lorafx.LoraSpec(r=2, targets=["c_attn"]))
    ids = token_batch(2, 5)
    with pytest.raises(ValueError, match="position_ids has shape"):
        lm(ids, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="integer"):
        lm(ids, position_ids=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"0\.\.63"):
        lm(ids, position_ids=torch.full((2, 5), 64))
