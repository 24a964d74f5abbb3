import torch
from conftest import tiny_model, token_batch

from lorafx.core.capture import capture
from lorafx.passes import dropout_follows_mode
from lorafx.passes.common import aten


def test_gpt2_dropouts_become_mode_aware_modules():
    model = tiny_model("gpt2", dropout=True)
    gm = capture(model).graph_module
    # embd dropout + per layer: resid dropout after attn and mlp; attention dropout in sdpa
    assert dropout_follows_mode(gm).counts == {"dropout": 1 + 2 * 2, "attention": 2}
    assert not any(n.target == aten.dropout.default for n in gm.graph.nodes)
    ids = token_batch()
    gm.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, model(ids).logits)
    gm.train()
    assert gm.get_submodule("transformer.drop").training


def test_zero_probability_dropouts_are_left_alone():
    gm = capture(tiny_model("llama")).graph_module
    assert dropout_follows_mode(gm).counts == {"dropout": 0, "attention": 0}
