"""diagnose() on constructed cases with a known answer."""

import json

import pytest
import safetensors.torch
import torch

import lorafx
from conftest import tiny_model
from lorafx.formats.adapters import AdapterError
from lorafx.tools.diagnose import HEATMAP_COLUMNS, LayerReport, diagnose, format_table, heatmap_values, write_heatmap


def write_adapter(folder, layers, r, alpha):
    folder.mkdir()
    tensors = {}
    for path, (a, b) in layers.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
    safetensors.torch.save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        f'{{"peft_type": "LORA", "r": {r}, "lora_alpha": {alpha}, "target_modules": ["proj"]}}'
    )
    return folder


def test_rank_norm_and_intruders(tmp_path):
    n = 64
    w0 = torch.diag(torch.linspace(2.0, 1.0, n))  # singular vectors: the standard basis
    spread = torch.ones(n, 1) / n**0.5  # cos with every basis vector = 1/8 < 0.5
    e0 = torch.zeros(n, 1)
    e0[0] = 1
    g = torch.Generator().manual_seed(0)
    layers = {
        # rank-2 update along directions W0 already has: no intruder
        "aligned.proj": (torch.cat([e0.T, torch.roll(e0, 1).T]) * 0.5, torch.cat([e0, torch.roll(e0, 1)], dim=1)),
        # strong update along a new direction: it becomes the top singular vector → one intruder
        "intruder.proj": (torch.cat([spread.T * 3, torch.zeros(1, n)]), torch.cat([spread * 3, torch.zeros(n, 1)], dim=1)),
        # random rank-2: rank 2
        "random.proj": (torch.randn(2, n, generator=g) * 0.01, torch.randn(n, 2, generator=g) * 0.01),
    }
    adapter = write_adapter(tmp_path / "ad", layers, r=2, alpha=2)
    reports = {r.path: r for r in diagnose(adapter, {p: w0 for p in layers}, k=5)}
    assert reports["aligned.proj"].rank == 2 and reports["aligned.proj"].intruders == 0
    assert abs(reports["aligned.proj"].effective_rank - 2.0) < 1e-4  # equal singular values
    assert reports["intruder.proj"].rank == 1 and reports["intruder.proj"].intruders == 1
    assert reports["random.proj"].rank == 2
    expected = (layers["random.proj"][1] @ layers["random.proj"][0]).norm() / w0.norm()
    assert abs(reports["random.proj"].relative_norm - expected.item()) < 1e-6
    assert "| intruder.proj | 64x64 | 1 |" in format_table(list(reports.values()))


def test_reads_base_from_checkpoint_and_model(tmp_path):
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 8))
    adapter = write_adapter(tmp_path / "ad", {"proj": (torch.randn(1, 8), torch.randn(8, 1))}, r=1, alpha=1)
    from_model = diagnose(adapter, model, k=2)
    safetensors.torch.save_file({"proj.weight": model.proj.weight.detach().contiguous()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    from_dir = diagnose(adapter, tmp_path, k=2)
    assert from_model == from_dir


def test_conv1d_base_keeps_its_layout(tmp_path):
    """GPT-2's Conv1D stores W as (in, out) (PEFT: fan_in_fan_out). A square one must not be read
    as (out, in): here W0ᵀ + ΔW has no intruder, W0 + ΔW has one."""
    n = 32
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < n:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    w0 = torch.diag(torch.linspace(2.0, 1.0, n)) @ hadamard / n**0.5  # (out, in); left singular vectors: the basis
    spread = torch.ones(n, 1) / n**0.5  # a left singular vector of W0ᵀ (hadamard's first row)
    e0 = torch.zeros(1, n)
    e0[0, 0] = 1
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.copy_(w0.T)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    lm = lorafx.transform(model, lorafx.LoraSpec(r=2, alpha=2, targets=r"transformer\.h\.0\.attn\.c_proj"))
    params = dict(lm.named_lora_parameters())
    with torch.no_grad():  # ΔW = 3·spread·e0ᵀ
        params["transformer.h.0.attn.c_proj.lora_A.weight"].copy_(torch.cat([e0 * 3**0.5, torch.zeros(1, n)]))
        params["transformer.h.0.attn.c_proj.lora_B.weight"].copy_(torch.cat([spread * 3**0.5, torch.zeros(n, 1)], 1))
    lm.save_adapter(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"]
    [report] = diagnose(tmp_path / "adapter", tmp_path / "base", k=5)
    assert (report.rank, report.intruders) == (1, 1)
    assert abs(report.relative_norm - 3 / w0.norm().item()) < 1e-5
    assert diagnose(tmp_path / "adapter", model, k=5) == [report]


def test_per_layer_rank_and_alpha(tmp_path):
    """PEFT's rank_pattern / alpha_pattern: each layer's scale is its own alpha over its own r."""
    a, b = torch.eye(4, 8), torch.eye(8, 4)  # B·A has 4 singular values of 1
    adapter = write_adapter(tmp_path / "ad", {"small.proj": (a[:2].clone(), b[:, :2].clone()), "big.proj": (a, b)}, r=2, alpha=2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"big.proj": 4},
                                                              "alpha_pattern": {r"b[a-z]+\.proj": 8}}))
    w0 = torch.eye(8)
    reports = {r.path: r for r in diagnose(adapter, {"small.proj": w0, "big.proj": w0}, k=2)}
    assert (reports["small.proj"].r, reports["small.proj"].rank) == (2, 2)
    assert abs(reports["small.proj"].relative_norm - 2**0.5 / 8**0.5) < 1e-6  # scale 2/2
    assert (reports["big.proj"].r, reports["big.proj"].rank) == (4, 4)
    assert abs(reports["big.proj"].relative_norm - 2 * 4**0.5 / 8**0.5) < 1e-6  # scale 8/4


def test_adapter_and_base_problems_are_named(tmp_path):
    adapter = write_adapter(tmp_path / "ad", {"proj": (torch.randn(1, 8), torch.randn(8, 1))}, r=1, alpha=1)
    safetensors.torch.save_file({"proj.weight": torch.zeros(4, 8, dtype=torch.uint8),
                                 "proj.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8)},
                                tmp_path / "model.safetensors")
    with pytest.raises(AdapterError, match="stores proj.weight in 4 bits"):
        diagnose(adapter, tmp_path)
    with pytest.raises(AdapterError, match="no weight proj.weight"):
        diagnose(adapter, {"other": torch.eye(8)})
    with pytest.raises(AdapterError, match=r"\(8, 8\) does not fit the base's weight \(8, 6\)"):
        diagnose(adapter, {"proj": torch.ones(8, 6)})
    lone = write_adapter(tmp_path / "lone", {"proj": (torch.randn(1, 8), torch.randn(8, 1))}, r=1, alpha=1)
    tensors = safetensors.torch.load_file(lone / "adapter_model.safetensors")
    del tensors["base_model.model.proj.lora_B.weight"]
    safetensors.torch.save_file(tensors, lone / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lora_B of 'proj' is missing"):
        diagnose(lone, {"proj": torch.eye(8)})
    for k, epsilon in [(0, 0.5), (2, 1.0), (2, 0.0)]:
        with pytest.raises(ValueError, match="need k >= 1 and 0 < epsilon < 1"):
            diagnose(adapter, {"proj": torch.eye(8)}, k=k, epsilon=epsilon)


def test_heatmap_values_and_file(tmp_path):
    reports = [LayerReport("a", (8, 8), rank=2, r=4, effective_rank=1.5, relative_norm=0.2, intruders=1),
               LayerReport("b", (8, 8), rank=4, r=4, effective_rank=4.0, relative_norm=0.05, intruders=0)]
    assert len(HEATMAP_COLUMNS) == 4
    assert heatmap_values(reports, k=2) == [[0.5, 0.375, 1.0, 0.5], [1.0, 1.0, 0.25, 0.0]]
    write_heatmap(reports, tmp_path / "h.png", k=2, block=3)
    data = (tmp_path / "h.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (4 * 3, 2 * 3)
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="no layers"):
        write_heatmap([], tmp_path / "empty.png", k=2)


def test_loraplus_groups():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    lm = lorafx.transform(mlp, lorafx.LoraSpec(r=2), example_args=(torch.randn(3, 4),))
    groups = lorafx.loraplus_param_groups(lm, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert [len(g["params"]) for g in groups] == [2, 2]
    torch.optim.AdamW(groups)
