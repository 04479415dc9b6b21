"""Read and write safetensors files one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once: for a 70B model that is 140 GB.
A converter knows every name, shape and dtype before it reads any data (they follow from the config),
so it can write the header first and then stream each tensor to its place in the file as it arrives;
memory then holds one tensor at a time.

Reading uses plain reads rather than a memory map: a memory map is cheap too, but every page of the
source the process has touched stays in its resident set until the file is closed, so the process
would appear to (and on a tight machine, compete to) hold the whole model.

The format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian header length
N, N bytes of JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`` padded with spaces to a multiple of 8, then the tensors' bytes, back to back, in the order
of their offsets.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from .source import ConversionError

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DTYPES = {code: dtype for dtype, code in DTYPE_NAMES.items()}


class SafetensorsReader:
    """The tensors of a safetensors file, by name; the header is read and checked at once (a file
    shorter than its header says is reported with the first tensor it cuts), the data on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.file = open(self.path, "rb")
            (n,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise ConversionError(f"{self.path}: not a readable safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self.data_start, size = 8 + n, self.path.stat().st_size
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][1]):
            begin, end = info["data_offsets"]
            if self.data_start + end > size:
                raise ConversionError(f"{self.path}: truncated: tensor {name} ends at byte {self.data_start + end} "
                                      f"but the file has {size} bytes; copy it again")
            if info["dtype"] not in DTYPES:
                raise ConversionError(f"{self.path}: tensor {name} has dtype {info['dtype']}; "
                                      f"expected one of {sorted(DTYPES)}")
            self.entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), begin, end)
        self.names = list(header)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:
            self.file.seek(self.data_start + begin)
            got = self.file.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if got != end - begin:
                raise ConversionError(f"{self.path}: truncated: tensor {name} has {got} of {end - begin} bytes")
        return tensor


class SafetensorsStream:
    """``layout`` maps each tensor name to its (shape, dtype); ``write`` each of them exactly once, then
    ``close``. A tensor that is not in the layout, has another shape, or is written twice is refused;
    ``close`` names the tensors never written."""

    def __init__(self, path: str | Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path, self.layout = Path(path), layout
        header: dict = {"__metadata__": metadata or {}}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, (shape, dtype) in layout.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = offset
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data then starts 8-byte aligned
        self.data_start = 8 + len(encoded)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.file.truncate(self.data_start + offset)  # the full size now; unwritten tensors read as holes
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.layout:
            raise KeyError(f"{self.path}: tensor {name} is not in the planned layout")
        if name in self.written:
            raise KeyError(f"{self.path}: tensor {name} written twice")
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8)
        self.file.seek(self.data_start + self.offsets[name])
        self.file.write(memoryview(data.numpy()))  # the tensor's own bytes: no second copy
        self.written.add(name)

    def close(self) -> None:
        self.file.close()
        never = [n for n in self.layout if n not in self.written]
        if never:
            raise ValueError(f"{self.path}: tensors never written: {never}")
