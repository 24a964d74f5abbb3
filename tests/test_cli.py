"""The `lorafx` command, run as a user runs it: a subprocess of the installed console script."""

import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

import lorafx
from lorafx import cli

LORAFX = os.path.join(os.path.dirname(sys.executable), "lorafx")
COMMANDS = ["demo", "inspect", "estimate", "merge", "export", "quantize"]


def lorafx_cmd(*args, timeout=300):
    return subprocess.run([LORAFX, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(out, command, *words):
    """A non-zero exit whose last stderr line names the problem, and no traceback."""
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lorafx {command}: error: "), out.stderr
    for word in words:
        assert word in last, last


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint folder and a LoRA adapter (non-zero B) for it."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    lm = lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(0, 0.1)
    lm.save_adapter(root / "adapter")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = lm.eval().merge()(ids).logits
    return {"root": root, "base": root / "base", "adapter": root / "adapter", "ids": ids, "expected": expected}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: lorafx {command}" in capsys.readouterr().out


def test_estimate_prints_formulas_and_numbers():
    out = lorafx_cmd("estimate", "--config", "llama-65b", "--r", "16", "--seq", "2048", "--batch", "1")
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert "| 16.00 |" in rows["full fine-tuning"]  # bytes per parameter
    qlora_total = float(rows["QLoRA (NF4)"].split("**")[1].split()[0])
    assert qlora_total < 48  # GB
    assert "QLoRA (NF4)      weights    = 2*F + 6*N + 0.5159*Q" in out.stdout


def test_estimate_bad_inputs_are_one_line_errors():
    out = lorafx_cmd("estimate", "--params", "lots")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "'lots' is not a number" in out.stderr
    out = lorafx_cmd("estimate", "--config", "gpt-5")
    assert out.returncode == 2 and "unknown config 'gpt-5': known are llama-7b" in out.stderr
    out = lorafx_cmd("estimate", "--params", "7e9", "--targets", "nothing")
    assert_one_line_error(out, "estimate", "matches no linear layer")


def test_inspect_lists_layers_and_targets(checkpoint):
    out = lorafx_cmd("inspect", checkpoint["base"], "--r", "4", "--targets", "q_proj,v_proj", "--seq", "16")
    assert out.returncode == 0, out.stderr
    assert "| model.layers.*.self_attn.q_proj | 2 | 32 → 32 | yes | yes | 512 |" in out.stdout
    assert "| lm_head | 1 | 32 → 96 | no | no | 0 |" in out.stdout
    assert "N = r·S = 4 × 224 = 896" in out.stdout


def test_inspect_missing_folder(tmp_path):
    out = lorafx_cmd("inspect", tmp_path / "nowhere")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_merge_writes_a_hf_folder_equal_to_lm_merge(checkpoint):
    out_dir = checkpoint["root"] / "merged"
    out = lorafx_cmd("merge", checkpoint["base"], checkpoint["adapter"], out_dir)
    assert out.returncode == 0, out.stderr
    assert "merged 4 LoRA layers" in out.stdout
    assert os.path.isfile(out_dir / "model.safetensors")
    merged = transformers.LlamaForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(checkpoint["ids"]).logits, checkpoint["expected"])


def test_merge_adapter_of_another_model_is_one_line_error(checkpoint, tmp_path):
    other = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    lm = lorafx.transform(transformers.LlamaForCausalLM(other), lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    lm.save_adapter(tmp_path / "adapter")
    out = lorafx_cmd("merge", checkpoint["base"], tmp_path / "adapter", tmp_path / "out")
    assert_one_line_error(out, "merge", "shape")


def test_export_writes_a_program_that_loads_without_lorafx(checkpoint):
    path = checkpoint["root"] / "model.pt2"
    out = lorafx_cmd("export", checkpoint["base"], checkpoint["adapter"], path)
    assert out.returncode == 0, out.stderr
    program = torch.export.load(str(path)).module()
    ids = checkpoint["ids"]
    torch.testing.assert_close(program(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"],
                               checkpoint["expected"])
    out = lorafx_cmd("export", checkpoint["base"], checkpoint["adapter"], checkpoint["root"] / "model.onnx")
    assert_one_line_error(out, "export", ".pt2")


def test_quantize_writes_a_4bit_checkpoint(checkpoint, tmp_path):
    out = lorafx_cmd("quantize", checkpoint["base"], tmp_path / "q")
    assert out.returncode == 0, out.stderr
    assert "stored 14 linear layers as NF4" in out.stdout
    keys = safetensors.torch.load_file(tmp_path / "q" / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in keys
    out = lorafx_cmd("quantize", tmp_path / "q", tmp_path / "again", "--blocksize", "48")
    assert_one_line_error(out, "quantize", "blocksize=48")
    out = lorafx_cmd("quantize", tmp_path, tmp_path / "out")  # a folder, but not a checkpoint
    assert_one_line_error(out, "quantize", "config.json")
