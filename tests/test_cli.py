"""The `lorafx` command, run as a user runs it: a subprocess of the installed console script."""

import os
import struct
import subprocess
import sys
import zlib

import peft
import pytest
import safetensors.torch
import torch
import transformers

import lorafx
from conftest import tiny_model, word_tokenizer
from lorafx.tools import cli
from lorafx.tools.diagnose import diagnose, heat_colour

LORAFX = os.path.join(os.path.dirname(sys.executable), "lorafx")
COMMANDS = ["demo", "inspect", "estimate", "merge", "generate", "export", "quantize", "diagnose"]


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


def test_generate_streams_the_tokens_peft_generates(checkpoint, capsys, tmp_path):
    theirs = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(checkpoint["base"]),
                                            checkpoint["adapter"]).eval()
    expected = theirs.generate(input_ids=torch.tensor([[5, 9, 12]]), max_new_tokens=6, do_sample=False)[0, 3:]
    code, out, err = cli_run(["generate", checkpoint["base"], "--adapter", checkpoint["adapter"], "--prompt", "5 9 12",
                              "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    assert out.split() == ["5", "9", "12", "|", *map(str, expected.tolist())]
    # With the checkpoint's tokenizer: text in, text out.
    words = [f"w{i}" for i in range(96)]
    with_tokenizer = tmp_path / "base"
    transformers.LlamaForCausalLM.from_pretrained(checkpoint["base"]).save_pretrained(with_tokenizer)
    word_tokenizer(words).save_pretrained(with_tokenizer)
    code, out, err = cli_run(["generate", with_tokenizer, "--adapter", checkpoint["adapter"], "--prompt", "w5 w9 w12",
                              "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    assert out.split() == ["w5", "w9", "w12", *[words[i] for i in expected.tolist()]]
    with theirs.disable_adapter():
        base = theirs.generate(input_ids=torch.tensor([[5, 9, 12]]), max_new_tokens=6, do_sample=False)
    code, out, _ = cli_run(["generate", checkpoint["base"], "--prompt", "5 9 12", "--max-new-tokens", "6"], capsys)
    assert out.split()[4:] == list(map(str, base[0, 3:].tolist()))
    code, out, err = cli_run(["generate", checkpoint["base"], "--prompt", "hello", "--max-new-tokens", "2"], capsys)
    assert code == 1 and "no tokenizer" in err and "Traceback" not in err


def test_merge_reads_the_adapter_type_ia3_like_peft(checkpoint, tmp_path):
    base = transformers.LlamaForCausalLM.from_pretrained(checkpoint["base"])
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False)
    theirs = peft.get_peft_model(base, config)
    theirs.save_pretrained(tmp_path / "ia3")
    with torch.no_grad():
        expected = theirs.merge_and_unload()(checkpoint["ids"]).logits
    out = lorafx_cmd("merge", checkpoint["base"], tmp_path / "ia3", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    assert "merged the IA3 adapter (4 tensors)" in out.stdout
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(checkpoint["ids"]).logits, expected, rtol=1e-5, atol=1e-5)


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
    (tmp_path / "plain").mkdir()
    out = lorafx_cmd("quantize", tmp_path / "plain", tmp_path / "out")  # a folder, but not a checkpoint
    assert_one_line_error(out, "quantize", "config.json")


# -- diagnose -------------------------------------------------------------------------------
# Each adapted layer gets ΔW = c·(u1·v1ᵀ + … ) with orthonormal u, v: its rank is the number of
# terms, its singular values are equal (effective rank = rank) and ‖ΔW‖/‖W0‖ is the chosen value.
DIAGNOSED = {  # layer: (rank, ‖ΔW‖/‖W0‖)
    "model.layers.0.self_attn.q_proj": (2, 0.05),
    "model.layers.0.self_attn.v_proj": (2, 0.4),
    "model.layers.1.self_attn.q_proj": (2, 0.2),
    "model.layers.1.self_attn.v_proj": (1, 0.1),
}


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    model = tiny_model("llama")
    model.save_pretrained(root / "base", safe_serialization=True)
    lm = lorafx.transform(model, lorafx.LoraSpec(r=4, alpha=4, targets=["q_proj", "v_proj"]))  # scale 1
    params = dict(lm.named_lora_parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, (rank, relative) in DIAGNOSED.items():
            a, b = params[f"{path}.lora_A.weight"], params[f"{path}.lora_B.weight"]
            u = torch.linalg.qr(torch.randn(b.shape[0], rank, generator=g)).Q
            v = torch.linalg.qr(torch.randn(a.shape[1], rank, generator=g)).Q
            c = relative * model.get_parameter(f"{path}.weight").norm() / rank**0.5
            a.zero_()
            b.zero_()
            a[:rank] = c * v.T
            b[:, :rank] = u
    lm.save_adapter(root / "adapter")
    return {"root": root, "base": root / "base", "adapter": root / "adapter"}


def cli_run(argv, capsys):
    """lorafx.cli.main in process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_png(path):
    """(width, height, pixel(x, y) → RGB) of an 8-bit RGB PNG, checking every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour_type, interlace) == (8, 2, 0)  # 8-bit RGB, not interlaced
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[y * stride] == 0 for y in range(height))  # filter type 0 on every row
    return width, height, lambda x, y: tuple(raw[y * stride + 1 + 3 * x : y * stride + 4 + 3 * x])


def test_diagnose_prints_the_constructed_numbers(diagnosed, capsys):
    code, out, err = cli_run(["diagnose", diagnosed["adapter"], "--base", diagnosed["base"], "--top-k", "3"], capsys)
    assert code == 0, err
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| model.")}
    assert list(rows) == sorted(DIAGNOSED)
    for path, (rank, relative) in DIAGNOSED.items():
        _, shape, got_rank, effective, norm, _ = rows[path]
        assert shape == ("32x32" if "q_proj" in path else "16x32")
        assert (int(got_rank), effective, norm) == (rank, f"{rank:.2f}", f"{relative:.4f}")
    reports = diagnose(diagnosed["adapter"], diagnosed["base"], k=3)
    mean = sum(relative for _, relative in DIAGNOSED.values()) / 4
    assert f"\n4 layers, mean ‖ΔW‖/‖W0‖ {mean:.4f}, {sum(r.intruders for r in reports)} intruder dimensions in total " \
           "(top-3 singular vectors, ε=0.5)\n" in out


def test_diagnose_png_heatmap(diagnosed, capsys):
    png = diagnosed["root"] / "heat.png"
    code, out, err = cli_run(["diagnose", diagnosed["adapter"], "--base", diagnosed["base"], "--png", png], capsys)
    assert code == 0, err
    assert f"heatmap {png}: a row per layer in table order; columns rank/r, effective rank/r" in out
    width, height, pixel = read_png(png)
    assert (width, height) == (4 * 16, 4 * 16)  # 4 metrics × 4 layers, 16 px cells

    def cell(row, column):
        colours = {pixel(column * 16 + dx, row * 16 + dy) for dx in (0, 7, 15) for dy in (0, 7, 15)}
        assert len(colours) == 1  # one flat block per cell
        return colours.pop()

    def near(colour, value):  # the metric came through float maths: allow one unit of rounding
        return max(abs(a - b) for a, b in zip(colour, heat_colour(value))) <= 1

    layers = sorted(DIAGNOSED)
    # rank/r: 2/4 for rank-2 layers, 1/4 for the rank-1 one
    for row, path in enumerate(layers):
        assert near(cell(row, 0), DIAGNOSED[path][0] / 4)
        assert near(cell(row, 1), DIAGNOSED[path][0] / 4)  # equal singular values: effective = rank
    # relative norm over the largest: the order of the colours (green rises along the map) is the norms' order
    by_norm = sorted(range(4), key=lambda row: DIAGNOSED[layers[row]][1])
    greens = [cell(row, 2)[1] for row in by_norm]
    assert greens == sorted(greens) and len(set(greens)) == 4
    assert near(cell(by_norm[-1], 2), 1.0) and near(cell(by_norm[0], 2), 0.05 / 0.4)
    for row, report in enumerate(diagnose(diagnosed["adapter"], diagnosed["base"], k=10)):
        assert near(cell(row, 3), report.intruders / 10)


def test_diagnose_errors_are_one_line(diagnosed, capsys, tmp_path):
    adapter, base = diagnosed["adapter"], diagnosed["base"]
    weights = safetensors.torch.load_file(base / "model.safetensors")
    (tmp_path / "partial").mkdir()
    safetensors.torch.save_file({k: v for k, v in weights.items() if "layers.1.self_attn.q_proj" not in k},
                                tmp_path / "partial" / "model.safetensors")
    (tmp_path / "other").mkdir()
    safetensors.torch.save_file({**weights, "model.layers.0.self_attn.v_proj.weight": torch.zeros(24, 32)},
                                tmp_path / "other" / "model.safetensors")
    (tmp_path / "empty").mkdir()
    cases = [  # (argv, exit code, words in the message)
        (["diagnose", tmp_path / "nowhere", "--base", base], 2, ["does not exist"]),
        (["diagnose", adapter], 2, ["--base"]),
        (["diagnose", base, "--base", base], 1, ["adapter_config.json is missing"]),
        (["diagnose", adapter, "--base", tmp_path / "empty"], 1, ["model.safetensors", "only safetensors"]),
        (["diagnose", adapter, "--base", tmp_path / "partial"], 1,
         ["no weight model.layers.1.self_attn.q_proj.weight", "trained on"]),
        (["diagnose", adapter, "--base", tmp_path / "other"], 1,
         ["model.layers.0.self_attn.v_proj", "(16, 32) does not fit", "(24, 32)"]),
        (["diagnose", adapter, "--base", base, "--top-k", "0"], 2, ["0 must be >= 1"]),
        (["diagnose", adapter, "--base", base, "--top-k", "many"], 2, ["'many' is not an integer"]),
        (["diagnose", adapter, "--base", base, "--epsilon", "1.5"], 2, ["between 0 and 1"]),
        (["diagnose", adapter, "--base", base, "--epsilon", "nan"], 2, ["between 0 and 1"]),
        (["diagnose", adapter, "--base", base, "--png", tmp_path / "no" / "heat.png"], 2, ["does not exist"]),
        (["diagnose", adapter, "--base", base, "--png", tmp_path / "heat.jpg"], 2, ["not a .png file name"]),
    ]
    for argv, expected, words in cases:
        code, out, err = cli_run(argv, capsys)
        assert code == expected, (argv, err)
        assert err.count("\n") == 1 and err.startswith("lorafx diagnose: error: "), (argv, err)
        assert all(word in err for word in words), (argv, err)
    assert not (tmp_path / "no").exists()


def test_diagnose_console_script(diagnosed):
    png = diagnosed["root"] / "script.png"
    out = lorafx_cmd("diagnose", diagnosed["adapter"], "--base", diagnosed["base"], "--png", png, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| model.layers.0.self_attn.v_proj | 16x32 | 2 | 2.00 | 0.4000 |" in out.stdout
    assert "4 layers, mean ‖ΔW‖/‖W0‖ 0.1875" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
