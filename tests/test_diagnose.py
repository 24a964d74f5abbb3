"""diagnose() on constructed cases with a known answer."""

import safetensors.torch
import torch

import lorafx
from lorafx.diagnose import diagnose, format_table


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


def test_loraplus_groups():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    lm = lorafx.transform(mlp, lorafx.LoraSpec(r=2), example_args=(torch.randn(3, 4),))
    groups = lorafx.loraplus_param_groups(lm, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert [len(g["params"]) for g in groups] == [2, 2]
    torch.optim.AdamW(groups)
