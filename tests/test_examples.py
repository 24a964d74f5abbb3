"""examples/ run as a user runs them: a fresh python, from the repo root."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_trl_example_trains_saves_and_peft_loads_the_adapter(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "sft_trl.py"), "--out", str(tmp_path), "--steps", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    difference = re.search(r"PEFT's logits differ by (\S+)\n", out.stdout)
    assert difference and float(difference.group(1)) <= 1e-5, out.stdout  # no-grad calls fold W + scale·B·A
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
