import pytest
import safetensors.torch
import torch

from lorafx.formats.safetensors_io import DTYPES, SafetensorsFile, SafetensorsFormatError


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {f"t_{name}": torch.arange(12).reshape(3, 4).to(dtype) for name, dtype in DTYPES.items()}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 5)
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with SafetensorsFile(str(tmp_path / "x.safetensors")) as f:
        assert sorted(f.keys()) == sorted(tensors)
        for key, expected in tensors.items():
            got = f.get_tensor(key)
            assert got.dtype == expected.dtype and torch.equal(got, expected), key


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x01\x00", "shorter than"),
        ((10**9).to_bytes(8, "little") + b"{}", "exceeds the file"),
        ((5).to_bytes(8, "little") + b"{nope", "not valid JSON"),
        ((2).to_bytes(8, "little") + b"{}", None),
    ],
)
def test_bad_headers(tmp_path, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    if message is None:
        with SafetensorsFile(str(path)) as f:
            assert f.keys() == []
        return
    with pytest.raises(SafetensorsFormatError, match=message):
        SafetensorsFile(str(path))


def test_offsets_and_truncation(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file({"w": torch.ones(64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(SafetensorsFormatError, match="the tensors end at data offset 256 but the data is 246 bytes"):
        SafetensorsFile(str(path))
