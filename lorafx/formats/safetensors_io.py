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
        if not isinstance(header, dict):
            raise SafetensorsFormatError(f"{self.path}: header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        for key, entry in header.items():
            self._check_entry(key, entry)
        # As the safetensors library requires: the tensors tile the data exactly, in offset order.
        end = 0
        for key, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
            start = entry["data_offsets"][0]
            if start != end:
                what = "overlaps the tensor before it" if start < end else f"leaves a gap of {start - end} bytes before it"
                raise SafetensorsFormatError(f"{self.path}: tensor {key!r} starts at data offset {start}, which {what}")
            end = entry["data_offsets"][1]
        if end != size - 8 - length:
            raise SafetensorsFormatError(
                f"{self.path}: the tensors end at data offset {end} but the data is {size - 8 - length} bytes "
                "(trailing bytes or a truncated file)"
            )
        return header, 8 + length

    def _check_entry(self, key: str, entry) -> None:
        def bad(why):
            raise SafetensorsFormatError(f"{self.path}: tensor {key!r} {why}")

        if not isinstance(entry, dict):
            bad(f"is described by a JSON {type(entry).__name__}, not an object")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in entry:
                bad(f"has no {field!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            bad(f"has dtype {dtype!r}; known are {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            bad(f"has shape {shape!r}; a shape is a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            bad(f"has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPES[dtype].itemsize != offsets[1] - offsets[0]:
            bad(f"has shape {shape} of {dtype} ({numel * DTYPES[dtype].itemsize} bytes) but data_offsets "
                f"{offsets} span {offsets[1] - offsets[0]} bytes")

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
