"""Reader for IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions),
one big-endian uint32 per dimension, then the values in C order, big-endian. The distributions
(Debian's `dataset-fashion-mnist`, torchvision's download) keep them gzip-compressed, raw or both,
so the reader accepts either and tells them apart by content, not by file name.

The reader is ours rather than torchvision's because the board-side agent should be able to read
its data without torchvision's download machinery, and because a truncated download deserves an
error that names the file instead of a reshape failure deep inside another library.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "read_idx"]

#: IDX dtype code -> big-endian numpy dtype, as defined by the format.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """Return the file's decompressed content, so that header checks see what the data says."""
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        # A download cut short leaves a gzip stream without its end; say which file it is.
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a native-endian numpy array.

    Raises ValueError naming the file when the magic number, the dimensions or the amount of
    data do not agree, so that a half-written file never becomes a silently wrong data set.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header (4 bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (must start with two zero bytes); "
            "not an IDX file"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"file has {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {what}: header says shape {dims} of {dtype.str} "
            f"({expected} data bytes), file holds {actual}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    # One copy, to native byte order: callers get a writable array torch can wrap without warnings.
    return values.astype(dtype.newbyteorder("="))
