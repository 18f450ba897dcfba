"""IDX files (the format of MNIST, Fashion-MNIST, KMNIST, EMNIST): a 4-byte magic (0, 0, type, number
of dimensions), the dimensions as big-endian uint32, then the values. kdfast reads and writes the
unsigned-byte type (0x08), raw or gzip-compressed (a ``.gz`` name)."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

UBYTE = 0x08


def read_idx(path: str | os.PathLike, ndim: int | tuple[int, ...]) -> np.ndarray:
    """The uint8 array of an IDX file with ``ndim`` dimensions (an int or the allowed ints)."""
    path = os.fspath(path)
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(data)} bytes)")
    zero, type_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code != UBYTE or dims not in allowed:
        want = " or ".join(f"0000 08 {d:02x}" for d in allowed)
        raise ValueError(f"{path}: bad idx magic {data[:4].hex()}; expected {want} (unsigned bytes, "
                         f"{' or '.join(map(str, allowed))} dimensions)")
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{dims}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise ValueError(f"{path}: header says shape {shape} ({count} bytes) but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array) -> str:
    """Writes a uint8 array (values 0..255) as an IDX file, gzip-compressed when ``path`` ends in .gz."""
    path = os.fspath(path)
    array = np.asarray(array)
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"write_idx stores unsigned bytes: values must be in [0, 255], got [{array.min()}, {array.max()}]")
    blob = struct.pack(">HBB", 0, UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    blob += array.astype(np.uint8).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(blob)
    return path
