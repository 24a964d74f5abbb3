"""Bad inputs, from the user's side: each gets an error that names the problem, and nothing the
user already had (model weights, optimizer state, files on disk) changes.

Adapter folders (load_adapter)
  1 adapter_config.json is not valid JSON          2 adapter_config.json is not a JSON object
  3 adapter_config.json lacks a field (r)          4 adapter_model.safetensors is truncated
  5 adapter_model.safetensors is garbage           6 an adapter for another model (GPT-2 into Llama)
  7 an adapter for another size of the model       8 an adapter with another r
  9 only a pickled adapter_model.bin
Weights given to NF4
 10 NaN weight to quantize_nf4                     11 Inf weight to quantize_nf4
 12 NaN weight in a model transformed with quantize="nf4"
Specs
 13 empty targets list                             14 empty targets string
 15 targets that match no layer                    16 r < 1
 17 huge r (r > min(in, out)): allowed, as in PEFT, and PEFT loads the adapter
Inputs at call time
 18 zero-length sequence                           19 zero-size batch
 20 1-D input_ids                                  21 float input_ids
 22 labels shaped unlike input_ids
Training checkpoints (load_checkpoint / save_checkpoint)
 23 missing checkpoint folder                      24 training_state.json corrupted
 25 training_state.safetensors truncated           26 optimizer of another class
 27 optimizer over other parameters                28 checkpoint of another model
 29 saved with rng=, loaded without                30 save over a folder that is not a checkpoint
Interrupted writes
 31 save_adapter SIGKILLed mid-write               32 save_checkpoint failing mid-write
 33 save_checkpoint SIGKILLed mid-write (tests/reliability/test_checkpoint_resume.py)

"""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import peft
import pytest
import safetensors.torch
import torch
import transformers
from conftest import COMMON, tiny_model, token_batch

import lorafx

SPEC = lorafx.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"])


def files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def lora_state(lm):
    return {n: p.detach().clone() for n, p in lm.named_lora_parameters()}


def unchanged(lm, before):
    return all(torch.equal(p, before[n]) for n, p in lm.named_lora_parameters())


@pytest.fixture(scope="module")
def llama():
    lm = lorafx.transform(tiny_model("llama"), SPEC)
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_()
    return lm


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    llama.save_adapter(folder)
    return folder


def broken_copy(src, dst, config=None, weights=None):
    """A copy of the adapter folder with adapter_config.json and/or the weights file replaced."""
    dst.mkdir()
    for name, data in files(src).items():
        (dst / name).write_bytes(data)
    if config is not None:
        (dst / "adapter_config.json").write_text(config)
    if weights is not None:
        (dst / "adapter_model.safetensors").write_bytes(weights)
    return dst


def good_config(adapter, **edit):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(edit)
    return json.dumps(config)


def weights_of(model, targets, folder):
    """adapter_model.safetensors of a same-r, same-alpha adapter for another model."""
    lorafx.transform(model, lorafx.LoraSpec(r=SPEC.r, alpha=SPEC.alpha, targets=targets)).save_adapter(folder)
    return (folder / "adapter_model.safetensors").read_bytes()


def wider_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "hidden_size": 64}))


# -- 1-9: adapter folders ---------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("not json", "adapter_config.json is not valid JSON"),
    ("not an object", "must hold a JSON object, got list"),
    ("no r", "has no 'r' field"),
    ("truncated", "not a valid safetensors file"),
    ("garbage", "not a valid safetensors file"),
    ("another model", "adapter lacks base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
    ("another size", r"has shape \(4, 64\), the model expects \(4, 32\)"),
    ("another r", "adapter r=8 but the model was transformed with r=4"),
    ("pickle only", "adapter_model.bin \\(pickle\\), which lorafx never loads"),
])
def test_bad_adapter_folder_is_refused_and_nothing_changes(llama, adapter, tmp_path, case, message):
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    folder = {
        "not json": lambda: broken_copy(adapter, tmp_path / "a", config="{r: 4,"),
        "not an object": lambda: broken_copy(adapter, tmp_path / "a", config="[4, 8]"),
        "no r": lambda: broken_copy(adapter, tmp_path / "a", config=json.dumps(
            {k: v for k, v in json.loads(good_config(adapter)).items() if k != "r"})),
        "truncated": lambda: broken_copy(adapter, tmp_path / "a", weights=weights[: len(weights) // 2]),
        "garbage": lambda: broken_copy(adapter, tmp_path / "a", weights=os.urandom(len(weights))),
        "another model": lambda: broken_copy(
            adapter, tmp_path / "a", weights=weights_of(tiny_model("gpt2"), ["c_attn"], tmp_path / "gpt2")),
        "another size": lambda: broken_copy(
            adapter, tmp_path / "a", weights=weights_of(wider_llama(), SPEC.targets, tmp_path / "wide")),
        "another r": lambda: broken_copy(adapter, tmp_path / "a", config=good_config(adapter, r=8)),
        "pickle only": lambda: _pickle_only(adapter, tmp_path / "a"),
    }[case]()
    on_disk, before = files(folder), lora_state(llama)
    with pytest.raises(lorafx.AdapterError, match=message):
        llama.load_adapter(folder)
    assert unchanged(llama, before) and files(folder) == on_disk


def _pickle_only(adapter, dst):
    folder = broken_copy(adapter, dst)
    os.remove(folder / "adapter_model.safetensors")
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"lora_A": [0.0]}))
    return folder


# -- 10-12: NF4 -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_to_quantize_nf4(bad):
    w = torch.randn(64, 64)
    w[3, 7] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf value"):
        lorafx.quantize_nf4(w)


def test_nan_weight_in_a_model_to_quantize_names_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        lorafx.transform(model, lorafx.LoraSpec(quantize="nf4"))


# -- 13-17: specs -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"targets": []}, "LoraSpec.targets=\\[\\] is invalid"),
    ({"targets": ""}, "LoraSpec.targets='' is invalid"),
    ({"r": 0}, "LoraSpec.r=0 is invalid: allowed is an integer >= 1"),
])
def test_bad_spec_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorafx.LoraSpec(**kwargs)


def test_targets_matching_nothing_lists_the_layers():
    with pytest.raises(lorafx.NoTargetError, match="matches no linear layer.*model.layers.0.mlp.down_proj"):
        lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(targets=["query"]))


def test_huge_r_is_allowed_as_in_peft(tmp_path):
    """r=48 > hidden 32: more than full rank, pointless but legal in PEFT, so legal here."""
    model = tiny_model("llama")
    lm = lorafx.transform(model, lorafx.LoraSpec(r=48, alpha=8, targets=["q_proj"])).eval()
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.normal_(std=0.1)
    lm.save_adapter(tmp_path)
    ids = token_batch()
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# -- 18-22: inputs at call time ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, r"shape \(2, 0\): batch and sequence length must be >= 1"),
    ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, r"shape \(0, 5\): batch and sequence length must be >= 1"),
    ({"input_ids": torch.zeros(5, dtype=torch.long)}, "input_ids must be a 2-D tensor"),
    ({"input_ids": torch.zeros(2, 5)}, "input_ids must hold integer token ids, got torch.float32"),
    ({"input_ids": token_batch(), "labels": torch.zeros(2, 3, dtype=torch.long)},
     r"labels has shape \(2, 3\); LlamaForCausalLM expects \(2, 7\), like input_ids"),
])
def test_bad_call_inputs(llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama(**kwargs)


# -- 23-30: training checkpoints --------------------------------------------------------------
class MLP(torch.nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.up = torch.nn.Linear(8, hidden)
        self.down = torch.nn.Linear(hidden, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def mlp_run(hidden=16):
    torch.manual_seed(0)
    lm = lorafx.transform(MLP(hidden), lorafx.LoraSpec(r=2, alpha=2), example_args=(torch.randn(3, 8),))
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
    lm(torch.randn(4, 8)).sum().backward()
    opt.step()
    return lm, opt


@pytest.fixture
def checkpoint(tmp_path):
    lm, opt = mlp_run()
    lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 5, rng=torch.Generator())
    return tmp_path / "ckpt"


def optimizer_tensors(opt):
    return [t.clone() for state in opt.state.values() for t in state.values()]


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("case, error, message", [
    ("missing folder", FileNotFoundError, "does not exist"),
    ("state json corrupted", lorafx.CheckpointError, "training_state.json is not valid JSON"),
    ("state tensors truncated", lorafx.CheckpointError, "training_state.safetensors is not a valid safetensors"),
    ("optimizer of another class", lorafx.CheckpointError, "holds the state of a AdamW optimizer, got a SGD"),
    ("optimizer over other parameters", lorafx.CheckpointError, "optimizer's parameters differ"),
    ("another model", lorafx.AdapterError, r"has shape \(16, 2\), the model expects \(32, 2\)"),
    ("no rng given", lorafx.CheckpointError, "pass that generator"),
])
def test_bad_checkpoint_load_changes_nothing(checkpoint, case, error, message):
    lm, opt = mlp_run(hidden=32 if case == "another model" else 16)
    params = lm.trainable_parameters()
    rng = torch.Generator()
    if case == "missing folder":
        checkpoint = checkpoint.parent / "nowhere"
    elif case == "state json corrupted":
        (checkpoint / "training_state.json").write_text('{"format": "lorafx.training_checkpoint", ')
    elif case == "state tensors truncated":
        _truncate(checkpoint / "training_state.safetensors")
    elif case == "optimizer of another class":
        opt = torch.optim.SGD(params, lr=1e-2)
    elif case == "optimizer over other parameters":
        opt = torch.optim.AdamW(params[:2], lr=1e-2)
    elif case == "no rng given":
        rng = None
    on_disk = files(checkpoint) if checkpoint.exists() else None
    before, opt_before, rng_before = lora_state(lm), optimizer_tensors(opt), torch.get_rng_state()
    with pytest.raises(error, match=message):
        lorafx.load_checkpoint(checkpoint, lm, opt, rng=rng)
    assert unchanged(lm, before) and len(optimizer_tensors(opt)) == len(opt_before)
    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(opt), opt_before))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert on_disk is None or files(checkpoint) == on_disk


def test_save_checkpoint_over_a_folder_that_is_not_a_checkpoint(tmp_path):
    lm, opt = mlp_run()
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="is not a lorafx checkpoint folder; refusing to replace it"):
        lorafx.save_checkpoint(tmp_path, lm, opt, 1)
    assert files(tmp_path) == {"notes.txt": b"my notes"}
    (tmp_path / "made-ahead").mkdir()  # an empty folder is fine
    lorafx.save_checkpoint(tmp_path / "made-ahead", lm, opt, 1)
    assert lorafx.load_checkpoint(tmp_path / "made-ahead", lm, opt) == 1


# -- 31-32: interrupted writes ----------------------------------------------------------------
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch, safetensors.torch, lorafx
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    lm = lorafx.transform(model, lorafx.LoraSpec(r=2, alpha=2), example_args=(torch.randn(3, 8),))
    lm.save_adapter(sys.argv[1])
    lm.save_adapter(sys.argv[2])  # a reference copy of what the first save wrote
    save_file = safetensors.torch.save_file

    def half_then_kill(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = half_then_kill
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.add_(1.0)
    print("saved once", flush=True)
    lm.save_adapter(sys.argv[1])
""")


def test_save_adapter_killed_mid_write_leaves_the_previous_adapter(tmp_path):
    folder, reference = tmp_path / "adapter", tmp_path / "reference"
    child = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder), str(reference)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL and "saved once" in child.stdout, child.stderr
    # The previous pair is intact; the half-written temp file is left beside it (a kill runs no cleanup).
    on_disk = files(folder)
    temp = [name for name in on_disk if name.startswith(".tmp-")]
    assert len(temp) == 1 and len(on_disk[temp[0]]) < len(on_disk["adapter_model.safetensors"])
    del on_disk[temp[0]]
    assert on_disk == files(reference)


def test_save_checkpoint_failing_mid_write_keeps_the_previous_checkpoint(checkpoint, monkeypatch):
    on_disk = files(checkpoint)
    lm, opt = mlp_run()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lorafx.save_checkpoint(checkpoint, lm, opt, 6, rng=torch.Generator())
    assert files(checkpoint) == on_disk
    assert sorted(os.listdir(checkpoint.parent)) == ["ckpt"]  # the temp folder is gone too
