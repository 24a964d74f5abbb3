"""lorafx.export: .pt2 programs and AOTInductor packages of merged tiny HF decoders, loaded in
a process that never imports lorafx; the choices an unmerged or NF4 model needs; bad inputs."""

import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from conftest import MLP, token_batch
from test_backend import one_layer_model, with_random_lora

import lorafx
from lorafx.generation.export import ExportError

SPEC = lorafx.LoraSpec(r=4, alpha=8)

# Runs in a fresh interpreter: load both files with torch alone and run them on the inputs.
LOAD_AND_RUN = textwrap.dedent(
    """
    import sys
    import safetensors.torch
    import torch

    folder = sys.argv[1]
    inputs = safetensors.torch.load_file(f"{folder}/inputs.safetensors")
    program = torch.export.load(f"{folder}/model.pt2").module()
    runner = torch._inductor.aoti_load_package(f"{folder}/model_aoti.pt2")
    outputs = {}
    for shape in ("a", "b"):
        ids, mask = inputs[f"ids_{shape}"], inputs[f"mask_{shape}"]
        outputs[f"program_{shape}"] = program(input_ids=ids)["logits"]
        outputs[f"aoti_{shape}"] = runner(input_ids=ids, attention_mask=mask)["logits"]
    assert "lorafx" not in sys.modules
    safetensors.torch.save_file(outputs, f"{folder}/outputs.safetensors")
    """
)


def ops(program) -> set:
    """Names of the ops an exported program calls, e.g. "aten::linear"."""
    return {n.target.name() for n in program.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}


def aten_only(program) -> bool:
    return all(op.startswith("aten::") for op in ops(program))


def test_round_trip_without_lorafx_at_two_shapes(tmp_path):
    merged = with_random_lora(lorafx.transform(one_layer_model("llama"), SPEC)).merge()
    ids = token_batch(2, 7)
    assert lorafx.export(merged, tmp_path / "model.pt2", ids) == str(tmp_path / "model.pt2")
    with_mask = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lorafx.export(merged, tmp_path / "model_aoti.pt2", with_mask, aot_inductor=True)
    assert aten_only(torch.export.load(tmp_path / "model.pt2"))
    inputs = {"ids_a": token_batch(3, 11, seed=3), "ids_b": token_batch(5, 4, seed=5)}
    for shape in ("a", "b"):
        mask = torch.ones_like(inputs[f"ids_{shape}"])
        mask[0, :2] = 0  # left padding in one row
        inputs[f"mask_{shape}"] = mask
    safetensors.torch.save_file(inputs, tmp_path / "inputs.safetensors")

    subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(tmp_path)], check=True, timeout=120)

    outputs = safetensors.torch.load_file(tmp_path / "outputs.safetensors")
    with torch.no_grad():
        for shape in ("a", "b"):
            ids, mask = inputs[f"ids_{shape}"], inputs[f"mask_{shape}"]
            torch.testing.assert_close(outputs[f"program_{shape}"], merged(ids).logits, atol=1e-5, rtol=1e-5)
            expected = merged(ids, attention_mask=mask).logits
            torch.testing.assert_close(outputs[f"aoti_{shape}"], expected, atol=1e-5, rtol=1e-5)
    assert merged.training is False


def test_unmerged_model_needs_merge_or_lora_keep(tmp_path):
    lm = with_random_lora(lorafx.transform(one_layer_model("qwen2"), SPEC)).train()
    ids = token_batch()
    with pytest.raises(ExportError, match=r"LoRA branches on 7 layers .*lm.merge\(\).*lora='keep'"):
        lorafx.export(lm, tmp_path / "model.pt2", ids)
    lorafx.export(lm, tmp_path / "model.pt2", ids, lora="keep")
    assert lm.training  # export runs in eval mode and puts the mode back
    program = torch.export.load(tmp_path / "model.pt2")
    assert aten_only(program)
    other = token_batch(4, 9, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(input_ids=other)["logits"], lm.eval()(other).logits)


def test_nf4_keep_exports_the_trained_qlora_model(tmp_path):
    lm = with_random_lora(lorafx.transform(one_layer_model("llama"), lorafx.LoraSpec(r=4, alpha=8, quantize="nf4")))
    lm.eval()
    ids = token_batch()
    path = tmp_path / "qlora.pt2"
    with pytest.raises(ExportError, match=r"lorafx::nf4_dequant x7.*quantize='keep'"):
        lorafx.export(lm, path, ids, lora="keep")
    with pytest.raises(ExportError, match="not supported with aot_inductor"):
        lorafx.export(lm, path, ids, lora="keep", quantize="keep", aot_inductor=True)
    lorafx.export(lm, path, ids, lora="keep", quantize="keep")
    program = torch.export.load(path)  # needs lorafx imported: it registers lorafx::nf4_dequant
    assert {op for op in ops(program) if not op.startswith("aten::")} == {"lorafx::nf4_dequant"}
    other = token_batch(3, 5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(input_ids=other)["logits"], lm(other).logits)
    # merge() dequantizes every layer it merges: nothing NF4 is left to keep.
    merged = lm.merge()
    with pytest.raises(ExportError, match="no NF4 weights"):
        lorafx.export(merged, path, ids, quantize="keep")


def test_plain_module_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    merged = with_random_lora(lorafx.transform(MLP(), SPEC, example_args=(x,))).merge()
    with pytest.raises(ExportError, match=r"do not match MLP.forward\(x\): too many positional arguments"):
        lorafx.export(merged, tmp_path / "mlp.pt2", (x, x))
    lorafx.export(merged, tmp_path / "mlp.pt2", (x,))
    program = torch.export.load(tmp_path / "mlp.pt2").module()
    y = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(program(y), merged(y))


def test_bad_arguments_and_inputs_name_the_problem(tmp_path):
    merged = lorafx.transform(one_layer_model("llama"), SPEC).merge()
    path = tmp_path / "model.pt2"
    ids = token_batch()
    cases = [
        (dict(example_inputs={"input_id": ids}), r"keys \['input_id'\]; the model takes \['input_ids', "),
        (dict(example_inputs=(ids,)), "input_ids tensor or a dict of keyword inputs, got tuple"),
        (dict(example_inputs=ids[0]), r"example_inputs\['input_ids'\] is \(7,\); expected a 2-D"),
        (dict(example_inputs={"input_ids": ids, "attention_mask": ids[:, :3]}), r"\['attention_mask'\] is \(2, 3\)"),
        (dict(example_inputs=ids.float()), "expected integer token ids"),
        (dict(example_inputs=ids[:1]), r"shape \(1, 7\); with dynamic=True use batch and sequence sizes >= 2"),
        (dict(example_inputs=ids, lora="merge"), "lora='merge' is invalid"),
        (dict(example_inputs=ids, quantize="nf4"), "quantize='nf4' is invalid"),
        (dict(example_inputs=ids, dynamic="yes"), "dynamic='yes' is invalid"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ExportError, match=message):
            lorafx.export(merged, path, **kwargs)
    with pytest.raises(ExportError, match="are .pt2 files"):
        lorafx.export(merged, tmp_path / "model.bin", ids)
    with pytest.raises(TypeError, match="takes a LoraModel .* got LlamaForCausalLM"):
        lorafx.export(one_layer_model("llama"), path, ids)
    # dynamic=False accepts a batch of one: the program is fixed to that shape.
    lorafx.export(merged, path, ids[:1], dynamic=False)
    program = torch.export.load(path).module()
    with torch.no_grad():
        torch.testing.assert_close(program(input_ids=ids[1:])["logits"], merged(ids[1:]).logits)


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    merged = lorafx.transform(one_layer_model("llama"), SPEC).merge()
    path = tmp_path / "model.pt2"
    path.write_bytes(b"previous export")

    def fail_midway(program, f):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        lorafx.export(merged, path, token_batch())
    assert path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["model.pt2"]


def readme_decode_loop() -> str:
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    block = readme.split("<!-- decode-loop -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    return block.replace('torch.export.load("decoder.pt2")', "torch.export.load(sys.argv[1])")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_kv_cache_program_decodes_like_generate_without_lorafx(tmp_path, arch):
    from conftest import tiny_model

    lm = lorafx.transform(tiny_model(arch), lorafx.LoraSpec(r=4, targets="all-linear"))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(std=0.2)
    lm.eval()
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = lm.generate(ids, attention_mask=mask, max_new_tokens=10)
    lorafx.export(lm.merge(), tmp_path / "decoder.pt2", ids, kv_cache=True, cache_len=32)
    safetensors.torch.save_file({"ids": ids, "mask": mask}, tmp_path / "inputs.safetensors")
    script = "\n".join([
        "import sys",
        "sys.modules['lorafx'] = None; sys.modules['transformers'] = None  # neither may be needed",
        readme_decode_loop(),
        "import safetensors.torch",
        f"inputs = safetensors.torch.load_file({str(tmp_path / 'inputs.safetensors')!r})",
        "first = greedy(program, inputs['ids'], inputs['mask'], 10, cache_len=32)",
        "again = greedy(program, inputs['ids'], inputs['mask'], 10, cache_len=32)  # the cache is reused",
        f"safetensors.torch.save_file({{'first': first, 'again': again}}, {str(tmp_path / 'out.safetensors')!r})",
    ])
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "decoder.pt2")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["first"], expected) and torch.equal(out["again"], expected)


def test_kv_cache_bad_arguments_are_named(tmp_path):
    from conftest import tiny_model

    merged = lorafx.transform(tiny_model("gpt2"), lorafx.LoraSpec(r=2, targets=["c_attn"])).merge()
    ids = token_batch(2, 4)
    with pytest.raises(ExportError, match="AOTInductor"):
        lorafx.export(merged, tmp_path / "d.pt2", ids, kv_cache=True, aot_inductor=True)
    with pytest.raises(ExportError, match=r"cache_len=65 .*\(64\)"):
        lorafx.export(merged, tmp_path / "d.pt2", ids, kv_cache=True, cache_len=65)
    with pytest.raises(ExportError, match="needs kv_cache=True"):
        lorafx.export(merged, tmp_path / "d.pt2", ids, cache_len=16)
    with pytest.raises(ExportError, match="kv_cache=True exports a causal language model"):
        lorafx.export(lorafx.transform(MLP(), lorafx.LoraSpec(r=2, targets=["up"]), example_args=(torch.randn(2, 8),)).merge(),
                      tmp_path / "d.pt2", torch.randn(2, 8), kv_cache=True)
    assert not os.path.exists(tmp_path / "d.pt2")
