"""Files on disk: saves that are atomic as a folder, modes, bad paths, and files that lie about
their contents. Each bad input gets an error that names the file (and the tensor, key or shard),
and nothing already on disk changes.

Saving (save_adapter, save_quantized, save_checkpoint)
  1 two processes saving different adapters into one folder while a third reads: every read is
    one save's pair
  2 a save SIGKILLed between its renames: the next read finishes it, the pair is the new save
  3 files and folders honour the umask (0644 / 0755 under 022)
  4 save_adapter("") / save_checkpoint("") / save_quantized(""): refused, nothing in the cwd
  5 disk full while writing: the error names the file, the previous files are byte-identical
  6 save_quantized into a folder holding a sharded checkpoint: refused (the index would win)
  7 save_checkpoint onto a symlinked folder: written through, the link kept, later saves work
Safetensors files (every shard read by from_pretrained / diagnose), as the safetensors library
refuses them
  8 tensor data offsets that overlap               9 a gap between tensors
 10 trailing bytes after the last tensor          11 a header that is a list
 12 an entry without shape / dtype / data_offsets 13 a negative dim
 14 an unknown dtype ("banana")                   15 shape × itemsize unlike the offsets
Shard index (model.safetensors.index.json)
 16 not JSON                                      17 not an object
 18 without weight_map                            19 a shard name that is absolute (/etc/passwd)
 20 a shard name with ".." (also "sub/../../x")   21 a key mapped to a shard that lacks it
"""

import errno
import inspect
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import tiny_model
from test_bad_inputs import files

import lorafx
from lorafx.formats import checkpoints
from lorafx.formats.adapters import read_adapter
from lorafx.formats.safetensors_io import SafetensorsFile, SafetensorsFormatError


def mlp_adapter(value=0.5, alpha=2):
    """A small LoRA model whose every LoRA weight is `value` (the killed child below builds it too)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    lm = lorafx.transform(model, lorafx.LoraSpec(r=2, alpha=alpha), example_args=(torch.randn(3, 8),))
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.fill_(value)
    return lm


# -- 1-2: atomic as a folder ------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, torch, lorafx
    import os, time
    folder, alpha, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    lm = lorafx.transform(model, lorafx.LoraSpec(r=8, alpha=alpha), example_args=(torch.randn(3, 64),))
    with torch.no_grad():
        for p in lm.trainable_parameters():
            p.fill_(alpha)  # the tensors say which save they belong to, as the config's lora_alpha does
    lm.save_adapter(folder)
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    for _ in range(5000):  # until the reader has seen both writers' saves (bounded in count and time)
        if os.path.exists(stop) or time.monotonic() > deadline:
            break
        lm.save_adapter(folder)
""")


def test_two_writers_and_a_reader_see_whole_saves_only(tmp_path):
    folder = tmp_path / "adapter"
    stop = tmp_path / "stop"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), alpha, str(stop)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for alpha in ("3.0", "5.0")]
    try:
        for w in writers:
            assert w.stdout.readline() == "ready\n", w.stderr.read()
        seen, reads, deadline = set(), 0, time.monotonic() + 120
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            config, tensors = read_adapter(folder)
            values = {v.item() for t in tensors.values() for v in t.unique()}
            assert values == {config["lora_alpha"]}, f"config of one save, tensors of another: {config['lora_alpha']} vs {values}"
            seen.add(config["lora_alpha"])
            reads += 1
            if len(seen) == 2 and reads >= 100:
                stop.touch()  # each writer ends after the save it is in
        for w in writers:
            assert w.wait(timeout=60) == 0, w.stderr.read()
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert seen == {3.0, 5.0}  # the reader ran while both were saving
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]


KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys, torch, lorafx
    exec(sys.argv[3])
    mlp_adapter(0.5, alpha=2).save_adapter(sys.argv[1])
    new = mlp_adapter(0.25, alpha=4)
    new.save_adapter(sys.argv[2])  # a reference copy of what the killed save writes
    replace = os.replace

    def replace_then_kill(src, dst):  # the first rename (the tensors) happens, the second never
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_kill
    print("saved once", flush=True)
    new.save_adapter(sys.argv[1])
""")


def test_save_killed_between_its_renames_is_finished_by_the_next_read(tmp_path):
    folder, reference = tmp_path / "adapter", tmp_path / "reference"
    child = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(folder), str(reference),
                            inspect.getsource(mlp_adapter)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL and "saved once" in child.stdout, child.stderr
    # On disk: the new tensors beside the old config, and the save's commit mark with its pending config.
    assert any(name.endswith(".commit") for name in os.listdir(folder))
    assert (folder / "adapter_config.json").read_bytes() != (reference / "adapter_config.json").read_bytes()
    lm = mlp_adapter(0.0, alpha=4)
    lm.load_adapter(folder)  # finishes the interrupted save, then reads the new pair
    assert files(folder) == files(reference)
    assert all(torch.all(p == 0.25) for p in lm.trainable_parameters())


# -- 3-7: saving --------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                           (0o002, 0o664, 0o775)])
def test_written_files_honour_the_umask(tmp_path, umask, file_mode, folder_mode):
    lm = mlp_adapter()
    opt = torch.optim.AdamW(lm.trainable_parameters())
    old = os.umask(umask)
    try:
        lm.save_adapter(tmp_path / "new" / "adapter")
        lm.save_adapter(tmp_path / "new" / "adapter")  # replacing files gives the same modes
        lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 1)
        lorafx.save_checkpoint(tmp_path / "ckpt", lm, opt, 2)
    finally:
        os.umask(old)
    for folder in (tmp_path / "new", tmp_path / "new" / "adapter", tmp_path / "ckpt"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == folder_mode, folder
    for folder in (tmp_path / "new" / "adapter", tmp_path / "ckpt"):
        for name in os.listdir(folder):
            assert stat.S_IMODE(os.stat(folder / name).st_mode) == file_mode, folder / name


@pytest.fixture(scope="module")
def nf4_llama():
    return lorafx.transform(tiny_model("llama"), lorafx.LoraSpec(r=4, quantize="nf4"))


def test_empty_folder_path_is_refused(tmp_path, monkeypatch, nf4_llama):
    monkeypatch.chdir(tmp_path)
    lm = mlp_adapter()
    for save, what in [(lambda: lm.save_adapter(""), "adapter"),
                       (lambda: lorafx.save_checkpoint("", lm, torch.optim.AdamW(lm.trainable_parameters()), 1),
                        "checkpoint"),
                       (lambda: nf4_llama.save_quantized(""), "checkpoint")]:
        with pytest.raises(ValueError, match=f"{what} folder path '' is empty: give the folder to write"):
            save()
    assert os.listdir(tmp_path) == []


def test_disk_full_names_the_file_and_keeps_the_previous_pair(tmp_path, monkeypatch):
    mlp_adapter(0.5).save_adapter(tmp_path)
    before = files(tmp_path)

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # a part was written when the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError) as e:
        mlp_adapter(0.25).save_adapter(tmp_path)
    assert e.value.errno == errno.ENOSPC
    assert f"No space left on device while writing {tmp_path / 'adapter_model.safetensors'}" in str(e.value)
    assert files(tmp_path) == before


def test_save_quantized_refuses_a_folder_holding_a_sharded_checkpoint(tmp_path, nf4_llama):
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    before = files(tmp_path)
    with pytest.raises(lorafx.CheckpointError, match=f"{tmp_path} holds a sharded checkpoint "
                                                     r"\(model.safetensors.index.json\).*write into an empty folder"):
        nf4_llama.save_quantized(tmp_path)
    assert files(tmp_path) == before


def test_save_checkpoint_writes_through_a_symlinked_folder(tmp_path):
    lm = mlp_adapter()
    opt = torch.optim.AdamW(lm.trainable_parameters())
    (tmp_path / "runs").mkdir()
    link = tmp_path / "ckpt"
    link.symlink_to(tmp_path / "runs" / "ckpt", target_is_directory=True)  # dangling until the first save
    for step in (1, 2, 3):
        lorafx.save_checkpoint(link, lm, opt, step)
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "runs" / "ckpt")
    assert sorted(os.listdir(tmp_path / "runs")) == ["ckpt"]
    assert lorafx.load_checkpoint(link, lm, opt) == 3


# -- 8-15: safetensors structure --------------------------------------------------------------
def raw_safetensors(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}


def broken(**b):
    return {"a": GOOD["a"], "b": {k: v for k, v in {**GOOD["b"], **b}.items() if v is not None}}


@pytest.mark.parametrize("header, size, message", [
    (broken(data_offsets=[4, 12]), 16, "tensor 'b' starts at data offset 4, which overlaps the tensor before it"),
    (broken(data_offsets=[12, 20]), 20, "tensor 'b' starts at data offset 12, which leaves a gap of 4 bytes"),
    (GOOD, 20, "the tensors end at data offset 16 but the data is 20 bytes"),
    ([GOOD["a"]], 8, "header is a JSON list, not an object"),
    (broken(shape=None), 16, "tensor 'b' has no 'shape'"),
    (broken(dtype=None), 16, "tensor 'b' has no 'dtype'"),
    (broken(data_offsets=None), 16, "tensor 'b' has no 'data_offsets'"),
    (broken(shape=[-2]), 16, r"tensor 'b' has shape \[-2\]; a shape is a list of integers >= 0"),
    (broken(dtype="banana"), 16, "tensor 'b' has dtype 'banana'; known are F64, F32"),
    (broken(shape=[3]), 16, r"tensor 'b' has shape \[3\] of F32 \(12 bytes\) but data_offsets \[8, 16\] span 8"),
], ids=["overlap", "gap", "trailing", "list", "no-shape", "no-dtype", "no-offsets", "negative-dim", "banana",
        "size"])
def test_malformed_safetensors_are_refused_as_the_library_refuses_them(tmp_path, header, size, message):
    path = tmp_path / "model.safetensors"
    raw_safetensors(path, header, bytes(size))
    with pytest.raises(safetensors.SafetensorError):
        safetensors.safe_open(path, "pt")  # the oracle
    with pytest.raises(SafetensorsFormatError, match=f"{path}: {message}"):
        SafetensorsFile(str(path))
    # where shards are read (from_pretrained, diagnose): the same reason, as a CheckpointError
    with pytest.raises(lorafx.CheckpointError, match=f"{path} is not a readable safetensors file: .*{message}"):
        checkpoints.checkpoint_index(str(tmp_path))


def test_well_formed_raw_file_reads_like_the_library(tmp_path):
    path = tmp_path / "model.safetensors"
    raw_safetensors(path, GOOD, torch.arange(4, dtype=torch.float32).numpy().tobytes())
    with SafetensorsFile(str(path)) as f:
        assert torch.equal(f.get_tensor("b"), safetensors.torch.load_file(path)["b"])


# -- 16-21: shard index -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "model"
    tiny_model("llama").save_pretrained(folder, max_shard_size="20KB")
    return folder


@pytest.fixture
def opened(monkeypatch):
    """The paths of every safetensors file the checkpoint reader opens."""
    paths = []

    class Recording(SafetensorsFile):
        def __init__(self, path):
            paths.append(os.path.abspath(path))
            super().__init__(path)

    monkeypatch.setattr(checkpoints, "SafetensorsFile", Recording)
    return paths


def edited_index(sharded, tmp_path, edit):
    folder = tmp_path / "model"
    shutil.copytree(sharded, folder)
    index = folder / checkpoints.INDEX
    content = json.loads(index.read_text())
    index.write_text(edit(content) if callable(edit) else edit)
    return folder, index, content


def remap(key_of, shard):
    def edit(content):
        content["weight_map"][key_of(content)] = shard
        return json.dumps(content)
    return edit


FIRST = lambda content: next(iter(content["weight_map"]))  # noqa: E731


@pytest.mark.parametrize("edit, message", [
    ("{nope", "is not valid JSON"),
    ("[]", r"holds a JSON list; expected an object with 'weight_map': \{key: shard file name\}"),
    ('{"metadata": {}}', "holds no 'weight_map' field"),
    (remap(FIRST, "/etc/passwd"), "maps '{key}' to '/etc/passwd': a shard must be a file name inside"),
    (remap(FIRST, "../outside.safetensors"), "maps '{key}' to '../outside.safetensors': a shard must be"),
    (remap(FIRST, "sub/../../outside.safetensors"), "maps '{key}' to 'sub/../../outside.safetensors'"),
], ids=["not-json", "list", "no-weight-map", "absolute", "dotdot", "nested-dotdot"])
def test_bad_shard_index_is_refused_and_nothing_outside_is_opened(tmp_path, sharded, opened, edit, message):
    # A real safetensors file outside the folder that holds the remapped key: following the name would load it.
    key = FIRST(json.loads((sharded / checkpoints.INDEX).read_text()))
    safetensors.torch.save_file({key: torch.zeros(1)}, tmp_path / "outside.safetensors")
    folder, index, _ = edited_index(sharded, tmp_path, edit)
    with pytest.raises(lorafx.CheckpointError, match=f"{index} {message.replace('{key}', key)}") as e:
        checkpoints.checkpoint_index(str(folder))
    assert "root:" not in str(e.value)
    assert all(path.startswith(str(folder) + os.sep) for path in opened), opened
    # from_pretrained, the user's way in, says the same before reading any weight
    with pytest.raises(lorafx.CheckpointError, match=f"{index} "):
        lorafx.from_pretrained(folder, lorafx.LoraSpec(r=4), progress=False)


def test_key_mapped_to_a_shard_that_lacks_it(tmp_path, sharded):
    shards = sorted(set(json.loads((sharded / checkpoints.INDEX).read_text())["weight_map"].values()))
    last = lambda content: next(k for k, v in content["weight_map"].items() if v == shards[-1])  # noqa: E731
    key = last(json.loads((sharded / checkpoints.INDEX).read_text()))
    folder, index, _ = edited_index(sharded, tmp_path, remap(last, shards[0]))
    with pytest.raises(lorafx.CheckpointError, match=f"{index} maps '{key}' to {shards[0]}, which does not contain it"):
        checkpoints.checkpoint_index(str(folder))


def test_shards_symlinked_inside_the_folder_still_load(tmp_path, sharded):
    """The Hugging Face cache links each snapshot's files to ../../blobs: names inside the folder are followed."""
    blobs, folder = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(sharded, blobs)
    folder.mkdir()
    for name in os.listdir(blobs):
        (folder / name).symlink_to(blobs / name)
    assert checkpoints.checkpoint_index(str(folder)).keys() == checkpoints.checkpoint_index(str(sharded)).keys()
