"""Reading ``.npy`` arrays from untrusted bundles and deltas, header first.

``np.load`` trusts the header: a 100-byte file that declares a 64 x 10^12 array raises a
``MemoryError``, structured and void dtypes give raw errors, NaN values pass. Here the
header is parsed and checked before anything is allocated:

* dtype: plain little/big-endian bool, integer or float (float16/32/64) -- no structured,
  void, object, string, complex, datetime or sub-array dtypes;
* shape: at most :data:`MAX_NDIM` dimensions, each a non-negative integer, matching the
  shape the caller expects (``None`` = any size in that dimension);
* size: the bytes the header declares must equal the bytes that follow it in the file, so
  an array is never larger than its (checksummed) file;
* values: float arrays must be finite unless the caller allows otherwise.

Every problem is a :class:`~edgeadapt.device.errors.BundleError` naming the file.
"""

from __future__ import annotations

import io
import math
import struct
from typing import BinaryIO, Sequence

import numpy as np

from edgeadapt.device.errors import BundleError

MAX_NDIM = 4
MAX_HEADER_BYTES = 4096
#: dtype kind -> allowed item sizes
_ALLOWED = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}
_CHUNK = 1 << 22


def read_npy(
    stream: BinaryIO,
    size: int,
    source: str,
    shape: Sequence[int | None] | None = None,
    kinds: str = "biuf",
    finite: bool = True,
) -> np.ndarray:
    """Read one ``.npy`` array of ``size`` bytes from ``stream`` after checking its header.

    Args:
        stream: binary stream positioned at the start of the ``.npy`` data.
        size: total bytes of the ``.npy`` data (file size / zip member size).
        source: name used in error messages.
        shape: expected shape; ``None`` entries match any size, ``None`` skips the check.
        kinds: allowed numpy dtype kinds (subset of "biuf").
        finite: refuse NaN and infinite values in float arrays.

    Returns:
        The array, in native byte order.

    Raises:
        BundleError: the header or data is malformed, unexpected or oversized.
    """
    header = _read_header(stream, source)
    try:
        buffer = io.BytesIO(header)
        version = np.lib.format.read_magic(buffer)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        declared, fortran, dtype = reader(buffer, max_header_size=MAX_HEADER_BYTES)
    except Exception as error:  # numpy's header parser raises ValueError, TypeError, SyntaxError, ...
        raise BundleError(f"{source} is not a valid .npy array ({type(error).__name__}: {error})") from error
    _check_dtype(dtype, source, kinds)
    if not isinstance(declared, tuple) or len(declared) > MAX_NDIM or not all(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in declared):
        raise BundleError(f"{source} declares the shape {declared!r}; expected at most {MAX_NDIM} non-negative sizes")
    if shape is not None:
        expected = tuple(shape)
        if len(declared) != len(expected) or any(want is not None and want != got for want, got in zip(expected, declared)):
            wanted = "(" + ", ".join("N" if value is None else str(value) for value in expected) + ")"
            raise BundleError(f"{source} has shape {declared}, expected {wanted}; the bundle is inconsistent")
    count = math.prod(declared)
    nbytes = count * dtype.itemsize
    if nbytes != size - len(header):
        raise BundleError(
            f"{source} declares {declared} {dtype} ({nbytes} bytes) but holds {size - len(header)} bytes of data; "
            "the file is corrupted"
        )
    array = np.empty(count, dtype=dtype)
    view = memoryview(array).cast("B") if nbytes else memoryview(b"")
    filled = 0
    while filled < nbytes:
        got = stream.readinto(view[filled: filled + _CHUNK])
        if not got:
            raise BundleError(f"{source} ends after {filled} of {nbytes} data bytes; the file is truncated")
        filled += got
    array = array.reshape(declared, order="F" if fortran else "C")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    if finite and dtype.kind == "f" and count and not np.isfinite(array).all():
        raise BundleError(f"{source} contains NaN or infinite values; the bundle is corrupted or was tampered with")
    return array


def _read_header(stream: BinaryIO, source: str) -> bytes:
    """Magic, version, length and header text, with the length checked *before* the text is read
    (numpy reads a header of any declared length -- up to 4 GiB -- before checking it)."""
    magic = _read_exactly(stream, 8, source)
    if magic[:6] != b"\x93NUMPY":
        raise BundleError(f"{source} is not a .npy array (no .npy magic); the file is corrupted")
    version = (magic[6], magic[7])
    if version not in ((1, 0), (2, 0)):
        raise BundleError(f"{source} is .npy format version {version[0]}.{version[1]}; only 1.0 and 2.0 are read")
    width = 2 if version == (1, 0) else 4
    length_bytes = _read_exactly(stream, width, source)
    length = struct.unpack("<H" if width == 2 else "<I", length_bytes)[0]
    if length > MAX_HEADER_BYTES:
        raise BundleError(f"{source} declares a {length}-byte .npy header (at most {MAX_HEADER_BYTES}); refusing it")
    return magic + length_bytes + _read_exactly(stream, length, source)


def _read_exactly(stream: BinaryIO, count: int, source: str) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise BundleError(f"{source} ends inside its .npy header; the file is truncated")
    return data


def read_npy_bytes(data: bytes, source: str, **checks) -> np.ndarray:
    """:func:`read_npy` on an in-memory ``.npy`` file."""
    return read_npy(io.BytesIO(data), len(data), source, **checks)


def _check_dtype(dtype: np.dtype, source: str, kinds: str) -> None:
    if not isinstance(dtype, np.dtype) or dtype.names is not None or dtype.subdtype is not None or dtype.hasobject:
        raise BundleError(f"{source} has a structured, sub-array or object dtype ({dtype}); only plain numbers are allowed")
    allowed = _ALLOWED.get(dtype.kind)
    if dtype.kind not in kinds or allowed is None or dtype.itemsize not in allowed:
        raise BundleError(
            f"{source} has dtype {dtype}; expected one of {describe_kinds(kinds)}: the bundle is corrupted"
        )


def describe_kinds(kinds: str) -> str:
    names = {"b": "bool", "i": "signed integers", "u": "unsigned integers", "f": "float16/32/64"}
    return ", ".join(names[kind] for kind in kinds if kind in names)
