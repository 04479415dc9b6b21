"""The safetensors format, read and written one tensor at a time.

The format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian header length
N, N bytes of JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`` padded with spaces to a multiple of 8, then the tensors' bytes, back to back, in the order of
their offsets.

Reading (``SafetensorsReader``): the safetensors library itself checks the header (``safe_open``
refuses a header too long or of the wrong JSON types, offsets out of order, overlapping, leaving gaps
or running past the file, and a byte range that does not hold its shape), so no number in the file is
believed before it is checked. The data is then read with plain reads into fresh tensors, not through
the library's memory map: every page of a mapped file the process has touched stays in its resident
set until the file is closed, so loading through the map would hold the whole file besides the model.

Writing (``SafetensorsStream``): ``safetensors.torch.save_file`` needs every tensor in memory at once,
140 GB for a 70B model. A converter knows every name, shape and dtype before it reads any data (they
follow from the config), so it writes the header first and then each tensor to its place as it arrives.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .cli import UsageError

# safetensors' dtype codes; the integer ones hold the codes of quantised checkpoints (quantize.py)
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8"}
DTYPES = {code: dtype for dtype, code in DTYPE_NAMES.items()}


class SafetensorsReader:
    """The tensors of a safetensors file, by name: the header is read and checked at once, the data on
    demand. Any problem is one UsageError naming the file (and the tensor)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with safe_open(self.path, framework="pt"):  # the library's checks of the header (module docstring)
                pass
            self.file = open(self.path, "rb")
        except (OSError, SafetensorError) as e:
            raise UsageError(f"{self.path}: {self.cut_tensor() or f'not a valid safetensors file ({e})'}; the file "
                             "is damaged: copy or convert it again") from None
        (n,) = struct.unpack("<Q", self.file.read(8))
        header = json.loads(self.file.read(n))  # checked above: N fits the file, every field has its type
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise UsageError(f"{self.path}: tensor {name} has dtype {info['dtype']}; expected one of {sorted(DTYPES)}")
            self.entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), *info["data_offsets"])
        self.names = list(header)

    def cut_tensor(self) -> str | None:
        """After the library refused the file: which tensor a truncated file cuts, if the header is sound."""
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(min(n, size)))
            ends = sorted((8 + n + info["data_offsets"][1], name) for name, info in header.items() if name != "__metadata__")
        except Exception:  # not even a header: the library's own message says what is wrong
            return None
        return next((f"truncated: tensor {name} ends at byte {end} but the file has {size} bytes"
                     for end, name in ends if end > size), None)

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
            if got != end - begin:  # the file shrank since it was opened
                raise UsageError(f"{self.path}: truncated: tensor {name} has {got} of {end - begin} bytes; copy it again")
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
