"""Writing safetensors files whose bytes depend only on their tensors and metadata.

The safetensors library keeps a file's metadata in a hash map whose order changes from one process to the next, so
two runs that end with equal tensors wrote different bytes (and so got different fingerprints). This writer lays
out the same format (an 8-byte little-endian header length, a JSON header padded with spaces to a multiple of 8,
then the raw little-endian bytes of each tensor, largest element size first, then by name) with every key in sorted
order, and it writes with Python's own file calls, so a full disk or a file-size limit is an ordinary `OSError`
(which the CLI turns into one line) rather than a library error. Files are read with `safetensors` as before.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
ALIGN = 8  # the data section starts on an 8-byte boundary


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy where it is already a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def save_file(tensors: dict[str, torch.Tensor], filename: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (and string `metadata`) as a safetensors file, byte for byte the same for the same input.

    Raises:
        ValueError: a dtype safetensors has no name for, or metadata that is not strings.
        OSError: the write failed (a full disk, a file-size limit, permissions).
    """
    if sys.byteorder != "little":  # pragma: no cover - every machine vsectl runs on is little-endian
        raise ValueError("safetensors files are little-endian; this machine is not")
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {"dtype": DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % ALIGN)
    try:
        with open(filename, "wb") as fh:
            fh.write(struct.pack("<Q", len(text)))
            fh.write(text)
            for name in order:
                fh.write(_raw(tensors[name]))
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a failed write() names no file: name this one
            raise OSError(e.errno, e.strerror, str(filename)) from None
        raise
