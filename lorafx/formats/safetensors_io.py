"""Read single tensors from a .safetensors file with plain reads, not a memory map.

safetensors' own reader maps the whole file: every page a tensor is read from stays in
the process's resident set while the map lives, so streaming a shard costs the shard's size
on top of the tensors kept. Here each tensor is read with `readinto` straight into the
buffer it will live in: one copy, nothing else resident. The format: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data.
"""

from __future__ import annotations

import json
import os
import struct

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class SafetensorsFormatError(ValueError):
    """The file is not a valid safetensors file; the message says why."""


class SafetensorsFile:
    """An open .safetensors file: `keys()`, `get_tensor(key)`. Validates the header on open."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        try:
            self._entries, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self):
        size = os.fstat(self._file.fileno()).st_size
        raw = self._file.read(8)
        if len(raw) < 8:
            raise SafetensorsFormatError(f"{self.path}: file is shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"{self.path}: header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"{self.path}: header is not valid JSON ({e})") from e
        header.pop("__metadata__", None)
        data_start, data_size = 8 + length, size - 8 - length
        for key, entry in header.items():
            start, end = entry.get("data_offsets", (-1, -1))
            if entry.get("dtype") not in DTYPES or not 0 <= start <= end <= data_size:
                raise SafetensorsFormatError(f"{self.path}: entry {key!r} has a bad dtype or offsets: {entry}")
            numel = 1
            for d in entry["shape"]:
                numel *= d
            if numel * DTYPES[entry["dtype"]].itemsize != end - start:
                raise SafetensorsFormatError(f"{self.path}: entry {key!r} size does not match its shape")
        return header, data_start

    def keys(self):
        return list(self._entries)

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        self._file.seek(self._data_start + start)
        if self._file.readinto(memoryview(buffer.numpy())) != end - start:
            raise SafetensorsFormatError(f"{self.path}: data of {key!r} is truncated")
        return buffer.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
