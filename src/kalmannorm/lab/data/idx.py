"""The idx format of MNIST and Fashion-MNIST, plain or gzip-compressed.

torchvision's MNIST classes read only uncompressed files laid out as ``root/<Name>/raw/``;
Debian's ``dataset-fashion-mnist`` package ships the original ``.gz`` files in one folder, so
we read the (tiny) format directly: a big-endian magic number ``0x0000TTNN`` (type T, N
dimensions), N big-endian uint32 sizes, then the data.
"""

from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path

import torch
from torch import Tensor

from kalmannorm.lab.errors import UserError


class DataCorruptError(UserError, ValueError):
    """A data file that is there but does not read (truncated, garbage, wrong format)."""


_IDX_TYPES = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}


def read_idx(path: str | Path) -> Tensor:
    """Read one idx file (``.gz`` or uncompressed) into a tensor of its stored type and shape."""
    path = Path(path)
    fix = "replace it with a fresh copy (or delete it and pass --download)"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataCorruptError(f"{path} does not read ({error}); {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataCorruptError(
            f"{path} is not an idx file (bad magic number {raw[:4].hex()}); {fix}"
        )
    dtype, size = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataCorruptError(f"{path}: the idx header is cut short; {fix}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = 1
    for n in shape:
        count *= n
    if len(raw) - offset != count * size:
        raise DataCorruptError(
            f"{path}: header says {shape} but the file holds {len(raw) - offset} bytes (truncated "
            f"or not an idx file); {fix}"
        )
    data = torch.frombuffer(bytearray(raw[offset:]), dtype=dtype)
    if size > 1 and sys.byteorder == "little":  # idx is big-endian
        data = data.view(torch.uint8).view(-1, size).flip(1).reshape(-1).view(dtype)
    return data.reshape(shape)


def write_idx(path: str | Path, tensor: Tensor) -> None:
    """Write ``tensor`` (uint8) as an idx file, gzip-compressed when ``path`` ends in ``.gz``."""
    if tensor.dtype != torch.uint8:
        raise ValueError("write_idx writes uint8 tensors only")
    header = bytes([0, 0, 0x08, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    payload = header + bytes(tensor.flatten().tolist())
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
