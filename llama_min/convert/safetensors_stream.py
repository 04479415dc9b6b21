"""Write a safetensors file one tensor at a time (reading one is checkpoint_files.SafetensorsReader).

``safetensors.torch.save_file`` needs every tensor in memory at once: for a 70B model that is 140 GB.
A converter knows every name, shape and dtype before it reads any data (they follow from the config),
so it can write the header first and then stream each tensor to its place in the file as it arrives;
memory then holds one tensor at a time.

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

from ..checkpoint_files import DTYPE_NAMES


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
