"""The `lorafx` command never loses the user's files and never ends in a traceback: each case
below exits non-zero with a last line `lorafx <command>: error: ...` naming the problem, and every
file under the test folder is byte-for-byte as it was (no half-written output either).

Writing onto its own input (exit 2, names both paths)
  1 merge BASE ADAPTER BASE                        2 merge into the adapter folder
  3 merge into a folder inside BASE                4 merge into a folder that holds BASE
  5 merge into a symlink to BASE                   6 quantize DIR DIR
  7 quantize into a folder inside DIR              8 export to a .pt2 inside the adapter folder
  9 diagnose --png inside the adapter folder
Output folders
 10 merge into a folder holding an older sharded model: the new model replaces it whole
    (no stale shard or index), and it loads in transformers and in lorafx
 11 quantize into a folder holding an older sharded model: same
 12 merge into a folder holding files that are not part of a model: refused, nothing deleted
 13 merge into a symlinked model folder: the link stays, its target holds the new model
Failures while running
 14 full disk while quantize writes: the error names the output folder; no new folder, an
    older model there is unchanged, no temp folder left
 15 diagnose of an adapter with a NaN weight
 16 adapter_config.json with "r": "8", "lora_alpha": "16", "target_modules": 5,
    "use_rslora": "yes" (merge, export, diagnose): the field and the file are named
 17 missing base, adapter or model folder (exit 2)
 18 unreadable files: truncated base model.safetensors (merge, quantize), a folder where
    adapter_model.safetensors should be
"""

import errno
import json
import os
import shutil

import pytest
import safetensors.torch
import torch
import transformers
from conftest import tiny_model, token_batch

import lorafx
from lorafx.tools import cli

SPEC = lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"])


@pytest.fixture
def work(tmp_path):
    """base (a tiny Llama), adapter (non-zero B) and the merged model's logits on token_batch()."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    lm = lorafx.transform(model, SPEC)
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(0, 0.1)
        expected = lm.eval().merge()(token_batch()).logits
    lm.save_adapter(tmp_path / "adapter")
    return {"root": tmp_path, "base": tmp_path / "base", "adapter": tmp_path / "adapter", "expected": expected}


def tree(root):
    """Every file and link under root: path → bytes (or the link's target)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                found[path] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                found[path] = open(path, "rb").read()
            else:
                found[path] = "dir"
    return found


def run_cli(argv, capsys):
    """lorafx's main in process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what the setup printed
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse, and refusals of the arguments
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(argv, capsys, root, code, *words):
    before = tree(root)
    got, _, err = run_cli(argv, capsys)
    assert got == code, (argv, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # above it at most the loaders' progress bars
    assert last.startswith(f"lorafx {argv[0]}: error: "), (argv, err)
    for word in words:
        assert str(word) in last, (argv, word, last)
    assert tree(root) == before, argv


def sharded_model(folder):
    tiny_model("llama", seed=5).save_pretrained(folder, max_shard_size="20KB")
    assert os.path.isfile(folder / "model.safetensors.index.json")


def model_files(folder):
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


# -- 1-9 ------------------------------------------------------------------------------------
def test_the_cli_never_writes_onto_its_input(work, capsys):
    base, adapter, root = work["base"], work["adapter"], work["root"]
    os.symlink(base, root / "link")
    cases = [  # (argv, the output, the input it overlaps, how)
        (["merge", base, adapter, base], base, base, "is"),
        (["merge", base, adapter, adapter], adapter, adapter, "is"),
        (["merge", base, adapter, base / "merged"], base / "merged", base, "is inside"),
        (["merge", base, adapter, root], root, base, "holds"),
        (["merge", base, adapter, root / "link"], root / "link", base, "is"),
        (["quantize", base, base], base, base, "is"),
        (["quantize", base, base / "q"], base / "q", base, "is inside"),
        (["export", base, adapter, adapter / "model.pt2"], adapter / "model.pt2", adapter, "is inside"),
        (["diagnose", adapter, "--base", base, "--png", adapter / "heat.png"], adapter / "heat.png", adapter, "is inside"),
    ]
    for argv, out, given, how in cases:
        assert_refused(argv, capsys, root, 2, f"output {out} {how} input folder {given}")


# -- 10-13 ----------------------------------------------------------------------------------
def test_merge_replaces_an_older_sharded_model_whole(work, capsys):
    out = work["root"] / "out"
    sharded_model(out)
    code, stdout, err = run_cli(["merge", work["base"], work["adapter"], out], capsys)
    assert code == 0, err
    assert model_files(out) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [n for n in os.listdir(work["root"]) if n.startswith(".")]  # no temp or .previous folder
    merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(token_batch()).logits, work["expected"])
        ours = lorafx.from_pretrained(out, lorafx.LoraSpec()).eval()
        with ours.disable_adapters():
            torch.testing.assert_close(ours(token_batch()).logits, work["expected"])
    assert (os.stat(out).st_mode & 0o777) == 0o777 & ~current_umask()


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_quantize_replaces_an_older_sharded_model_whole(work, capsys):
    out = work["root"] / "q"
    sharded_model(out)
    code, _, err = run_cli(["quantize", work["base"], out], capsys)
    assert code == 0, err
    assert model_files(out) == ["config.json", "model.safetensors"]
    keys = safetensors.torch.load_file(out / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_4bit"]


def test_a_folder_with_other_files_is_not_replaced(work, capsys):
    out = work["root"] / "mine"
    sharded_model(out)
    (out / "notes.txt").write_text("my notes")
    assert_refused(["merge", work["base"], work["adapter"], out], capsys, work["root"], 1,
                   out, "notes.txt", "not part of a model")
    assert_refused(["quantize", work["base"], work["root"]], capsys, work["root"], 2, "holds input folder")


def test_a_symlinked_model_folder_keeps_its_link(work, capsys):
    target = work["root"] / "target"
    sharded_model(target)
    os.symlink(target, work["root"] / "out")
    code, _, err = run_cli(["merge", work["base"], work["adapter"], work["root"] / "out"], capsys)
    assert code == 0, err
    assert os.path.islink(work["root"] / "out")
    assert model_files(target) == ["config.json", "generation_config.json", "model.safetensors"]


# -- 14-18 ----------------------------------------------------------------------------------
def test_full_disk_while_quantizing_leaves_no_folder(work, capsys, monkeypatch):
    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # part of the file got written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = work["root"] / "q"
    assert_refused(["quantize", work["base"], out], capsys, work["root"], 1, f"could not write {out}",
                   "No space left on device")
    assert not out.exists()
    sharded_model(out)  # an older model there stays as it was
    assert_refused(["quantize", work["base"], out], capsys, work["root"], 1, f"could not write {out}")


def test_diagnose_of_a_nan_adapter(work, capsys):
    nan = work["root"] / "nan"
    shutil.copytree(work["adapter"], nan)
    tensors = safetensors.torch.load_file(nan / "adapter_model.safetensors")
    next(t for k, t in tensors.items() if "lora_A" in k)[0, 0] = float("nan")
    safetensors.torch.save_file(tensors, nan / "adapter_model.safetensors")
    assert_refused(["diagnose", nan, "--base", work["base"]], capsys, work["root"], 1, nan, "NaN/Inf")


@pytest.mark.parametrize("field, value, allowed", [
    ("r", "8", "an integer >= 1"),
    ("lora_alpha", "16", "a finite number"),
    ("target_modules", 5, "a regex string or a list of module names"),
    ("use_rslora", "yes", "true or false"),
])
def test_bad_adapter_config_types(work, capsys, field, value, allowed):
    bad = work["root"] / "bad"
    shutil.copytree(work["adapter"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    for argv in (["merge", work["base"], bad, work["root"] / "out"],
                 ["export", work["base"], bad, work["root"] / "out.pt2"],
                 ["diagnose", bad, "--base", work["base"]]):
        assert_refused(argv, capsys, work["root"], 1, bad / "adapter_config.json", f"{field}={value!r}", allowed)


def test_missing_folders(work, capsys):
    nowhere = work["root"] / "nowhere"
    for argv in (["merge", nowhere, work["adapter"], work["root"] / "out"],
                 ["merge", work["base"], nowhere, work["root"] / "out"],
                 ["quantize", nowhere, work["root"] / "out"],
                 ["export", work["base"], nowhere, work["root"] / "out.pt2"],
                 ["diagnose", nowhere, "--base", work["base"]]):
        assert_refused(argv, capsys, work["root"], 2, nowhere, "does not exist")


def test_unreadable_files(work, capsys):
    truncated = work["root"] / "truncated"
    shutil.copytree(work["base"], truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    out = work["root"] / "out"
    assert_refused(["merge", truncated, work["adapter"], out], capsys, work["root"], 1, truncated, "safetensors")
    assert_refused(["quantize", truncated, out], capsys, work["root"], 1, truncated / "model.safetensors")
    hollow = work["root"] / "hollow"
    shutil.copytree(work["adapter"], hollow)
    os.remove(hollow / "adapter_model.safetensors")
    os.mkdir(hollow / "adapter_model.safetensors")
    assert_refused(["merge", work["base"], hollow, out], capsys, work["root"], 1, hollow / "adapter_model.safetensors")
