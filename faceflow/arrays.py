"""Arrays in .npz files that anyone may have written: read without pickle, sized before they are decompressed.

``npz_bytes`` writes named arrays as an .npz whose bytes depend on the arrays alone (no time
stamp), so a file written twice from the same arrays is byte-identical. ``read_npz`` reads the
header of every member first (numpy's own ``read_magic`` and ``read_array_header_*``) and
refuses an archive whose headers announce more than a limit before a byte is decompressed, an
object array (which would need pickle), or a member that is not a plain ``.npy`` array.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

# A fixed time stamp for every member: the zip format's earliest date.
_EPOCH = (1980, 1, 1, 0, 0, 0)


class ArchiveError(ValueError):
    """An .npz that is not plain arrays, or announces more than allowed; the message names the file."""


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``arrays`` as an uncompressed .npz (``np.load`` reads it), byte-identical for identical arrays."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            npy_format.write_array(member, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH), member.getvalue())
    return buffer.getvalue()


def announced_arrays(source: Path | bytes, name: str, max_bytes: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each member's (shape, dtype) as its .npy header announces it, before any data is read.

    ArchiveError names ``name`` (the file, or what the bytes are) when it is not a zip of .npy
    arrays, when a member would need pickle, or when the headers announce more than ``max_bytes``
    of array data in all.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (zipfile.BadZipFile, OSError) as error:
        raise ArchiveError(f"{name}: not a readable .npz ({error})") from None
    announced: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise ArchiveError(f"{name}: member {info.filename!r} is not an .npy array")
            with archive.open(info) as member:
                try:
                    version = npy_format.read_magic(member)
                    reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
                    shape, _, dtype = reader(member)
                except (ValueError, EOFError) as error:
                    raise ArchiveError(f"{name}: member {info.filename!r} has no readable .npy header ({error})") from None
            if dtype.hasobject:
                raise ArchiveError(f"{name}: member {info.filename!r} holds Python objects, which would need pickle; "
                                   "only numbers, booleans and strings are read")
            total += math.prod(shape) * dtype.itemsize
            if max_bytes is not None and total > max_bytes:
                raise ArchiveError(f"{name}: its headers announce {size_text(total)} of arrays or more "
                                   f"(member {info.filename!r}: shape {shape}, {dtype}); the limit is {size_text(max_bytes)}")
            announced[info.filename.removesuffix(".npy")] = (shape, dtype)
    return announced


def read_npz(source: Path | bytes, name: str, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Every array of an .npz, its headers checked first (announced_arrays); never pickle."""
    announced_arrays(source, name, max_bytes)
    try:
        with np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ArchiveError(f"{name}: not a readable .npz ({error})") from None


def size_text(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:,} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError
