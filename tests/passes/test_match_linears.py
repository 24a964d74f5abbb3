import torch
from conftest import tiny_model

import lorafx
from lorafx.core.capture import capture
from lorafx.passes import match_linears
from lorafx.passes.common import LINEAR


def sites(gm):
    return [n.meta[LINEAR] for n in gm.graph.nodes if LINEAR in n.meta]


def test_llama_linears_and_paths():
    gm = capture(tiny_model("llama")).graph_module
    result = match_linears(gm)
    assert result.counts == {"linear": 2 * 7 + 1, "skipped": 0}
    q = next(s for s in sites(gm) if s.path == "model.layers.0.self_attn.q_proj")
    assert (q.in_features, q.out_features, q.fan_in_fan_out) == (32, 32, False)


def test_gpt2_conv1d_is_fan_in_fan_out():
    gm = capture(tiny_model("gpt2")).graph_module
    assert match_linears(gm).counts["linear"] == 2 * 4 + 1
    c_attn = next(s for s in sites(gm) if s.path == "transformer.h.0.attn.c_attn")
    assert (c_attn.in_features, c_attn.out_features, c_attn.fan_in_fan_out) == (32, 96, True)


def test_linear_on_a_computed_weight_is_skipped():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.w = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.nn.functional.linear(self.proj(x), self.w * 2)

    gm = capture(Scaled(), (torch.randn(2, 4),)).graph_module
    assert match_linears(gm).counts == {"linear": 1, "skipped": 1}
    assert [s.path for s in sites(gm)] == ["proj"]
    assert lorafx.LoraSpec().selects("proj")
