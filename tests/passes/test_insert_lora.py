import pytest
import torch
from conftest import tiny_model

import lorafx
from lorafx.core.capture import capture
from lorafx.passes import NoTargetError, insert_lora, match_linears
from lorafx.passes.common import LORA, aten


def test_inserts_one_tagged_branch_per_selected_layer():
    gm = capture(tiny_model("mistral")).graph_module
    match_linears(gm)
    before = len(gm.graph.nodes)
    spec = lorafx.LoraSpec(r=2, alpha=4, dropout=0.1, targets=["q_proj", "v_proj"])
    assert insert_lora(gm, spec).counts == {"linear": 15, "lora": 4, "modules": 4, "saved": 0}
    assert len(gm.graph.nodes) == before + 4 * 7
    roles = [n.meta[LORA][1] for n in gm.graph.nodes if LORA in n.meta]
    assert roles.count("add") == 4 and roles.count("dropout") == 4
    scale = next(n for n in gm.graph.nodes if n.meta.get(LORA, (0, 0))[1] == "scale")
    assert scale.target == aten.mul.Tensor and scale.args[1] == 2.0
    q = gm.get_submodule("model.layers.0.self_attn.q_proj")
    assert (q.lora_A.weight.shape, q.lora_B.weight.shape) == ((2, 32), (32, 2))
    assert torch.count_nonzero(q.lora_B.weight) == 0 and torch.count_nonzero(q.lora_A.weight) > 0
    assert isinstance(q.lora_dropout, torch.nn.Dropout) and q.lora_dropout.p == 0.1
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == [
        f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight" for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"
    ]


def test_gaussian_init():
    gm = capture(tiny_model("llama")).graph_module
    match_linears(gm)
    insert_lora(gm, lorafx.LoraSpec(r=64, init="gaussian", targets=["gate_proj"]))
    a = gm.get_submodule("model.layers.0.mlp.gate_proj").lora_A.weight
    assert abs(a.std().item() - 1 / 64) < 0.003


def test_no_match_error_lists_existing_layers():
    gm = capture(tiny_model("gpt2")).graph_module
    match_linears(gm)
    try:
        insert_lora(gm, lorafx.LoraSpec(targets=["q_proj"]))
    except NoTargetError as e:
        assert "transformer.h.0.attn.c_attn" in str(e) and "LoraSpec.targets=('q_proj',)" in str(e)
    else:
        raise AssertionError("expected NoTargetError")


class Mixed(torch.nn.Module):
    """One module of each type PEFT adapts and lorafx does not, and a linear layer."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv1d(8, 8, 1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1)
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(self.emb(x).transpose(1, 2))
        h = self.conv2(h.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.fc(self.mha(h, h, h)[0])


@pytest.mark.parametrize(
    "targets, named, kind",
    [
        (["emb", "fc"], "emb", "an embedding"),
        (["conv", "fc"], "conv", "a convolution"),
        (["conv2", "fc"], "conv2", "a convolution"),
        (["mha", "fc"], "mha", "nn.MultiheadAttention"),
        (r"(conv|fc)", "conv", "a convolution"),
        (["emb"], "emb", "an embedding"),  # alone: the same reason, not "matches no linear layer"
    ],
)
def test_listed_target_lorafx_cannot_adapt_is_named_not_dropped(targets, named, kind):
    x = torch.randint(0, 10, (2, 5))
    with pytest.raises(NoTargetError, match=rf"selects '{named}' \(\w+\), {kind}.*cannot adapt"):
        lorafx.transform(Mixed(), lorafx.LoraSpec(targets=targets), example_args=(x,))
    # Left out by exclude, or by all-linear (PEFT's all-linear adapts linear layers only): fc alone.
    others = ["emb", "conv", "conv2", "mha"]
    lm = lorafx.transform(Mixed(), lorafx.LoraSpec(targets=["fc", named], exclude=others), example_args=(x,))
    assert lm.lora_paths() == ["fc"]
    assert lorafx.transform(Mixed(), lorafx.LoraSpec(), example_args=(x,)).lora_paths() == ["fc"]


def test_listed_embedding_of_a_hf_model_is_named():
    with pytest.raises(NoTargetError, match=r"selects 'model.embed_tokens' \(Embedding\), an embedding"):
        lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(targets=["embed_tokens", "q_proj"]))
