"""Streamed .npy and .npz outputs of `inferd batch`: each chunk written at its place in the final file as committed.

A .npy header holds the array's whole shape and a .npz (a ZIP of .npy members) holds each member whole, with its
size and CRC-32 in front, so numpy's and zipfile's writers need every row before the first byte of the next member;
for a cheap model that write after the last chunk was a serial tail as long as the scoring itself. When the row count
is known before the run (.npy, .npz and Parquet inputs record it) and every column has a fixed width, the whole file's
layout follows from the first chunk's schema: each member's local header, .npy header and data lie at offsets known
at once. So each chunk goes to its offsets (``os.pwrite``) in a file of the run's work folder on the writer thread,
overlapping the scoring; the CRC-32s accumulate as chunks arrive in order; and ``close`` only writes the headers
that hold them, the central directory and the end records, then fsyncs and renames. The file is the rows' only copy:
a chunk's commit records ``state()`` (rows written, rows left out, the CRC-32s so far) once ``commit()`` has put its
rows on disk, and a resumed run ``reopen``s the file at that state.

Rejected rows make the count smaller than planned: a .npy output is cut after the rows scored and its header
rewritten (padded to the same length); a .npz one would leave a gap after each member, so ``close`` copies it tight
(each member's CRC-32 computed again over the rows kept). Text columns (ids read as strings) have no width until
every row is seen: ``accepts`` says no and the work folder assembles that output from its parts at the end, as for
an input of unknown length. Archives always carry zip64 fields (each member's local header and central entry, and
the zip64 end records), so the layout never depends on the sizes and every run takes the path a file over 4 GiB
needs; timestamps are the DOS epoch, so a resumed run's file is byte for byte an uninterrupted one's.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from daemon.batch_arrow import numpy_of
from daemon.batch_io import row_shapes
from daemon.fsutil import fsync_dir

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # ZIP local file header (30 bytes), then name, then extra
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry (46 bytes), then name, then extra
_END64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory record
_LOCATOR = struct.Struct("<IIQI")  # zip64 end of central directory locator
_END = struct.Struct("<IHHHHIIH")  # end of central directory record
_VERSION = 45  # "version needed to extract": zip64
_UTF8_NAME = 0x800
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, 00:00:00 (time 0): the same bytes on every run
_MAX32, _MAX16 = 0xFFFFFFFF, 0xFFFF


def fixed_dtype(t: pa.DataType) -> np.dtype[Any] | None:
    """The numpy type of a column's values when each row has a fixed width (a list column: its items'), else None."""
    if pa.types.is_fixed_size_list(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return np.dtype(f"<{'i' if pa.types.is_signed_integer(t) else 'u'}{t.bit_width // 8}")
    if pa.types.is_floating(t):
        return np.dtype(f"<f{t.bit_width // 8}")
    if pa.types.is_boolean(t):
        return np.dtype(np.bool_)
    return None


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...], size: int = 0) -> bytes:
    """A version 1.0 .npy header, ``size`` bytes long (padded with spaces) or the next multiple of 64 bytes."""
    text = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body = text.encode("latin1")
    total = size or -(-(10 + len(body) + 1) // 64) * 64
    pad = total - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"a .npy header for shape {shape} does not fit in {total} bytes")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", total - 10) + body + b" " * pad + b"\n"


@dataclass
class _Member:
    """One array of the output: where its local header, .npy header and data go, and its CRC-32 so far."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    row_bytes: int
    header: bytes
    zip_name: bytes
    header_at: int
    data_at: int
    crc: int

    def local_header(self, size: int) -> bytes:
        return (_LOCAL.pack(0x04034B50, _VERSION, _flags(self.zip_name), 0, 0, _DOS_DATE, self.crc, _MAX32, _MAX32,
                            len(self.zip_name), 20)
                + self.zip_name + struct.pack("<HHQQ", 1, 16, size, size))

    def central_entry(self, size: int) -> bytes:
        return (_CENTRAL.pack(0x02014B50, (3 << 8) | _VERSION, _VERSION, _flags(self.zip_name), 0, 0, _DOS_DATE,
                              self.crc, _MAX32, _MAX32, len(self.zip_name), 28, 0, 0, 0, 0o644 << 16, _MAX32)
                + self.zip_name + struct.pack("<HHQQQ", 1, 24, size, size, self.header_at))


def _flags(name: bytes) -> int:
    return 0 if name.isascii() else _UTF8_NAME


class ArrayStream:
    """A .npy or .npz output of ``rows`` rows planned, written chunk by chunk at its offsets in ``temp`` (a file of
    the run's work folder, so that a resumed run goes on writing it); ``close`` makes it the output (headers,
    central directory, fsync, rename), ``discard`` removes it, ``release`` only lets go of it (kept for --resume)."""

    def __init__(self, path: Path, fmt: str, rows: int, temp: Path) -> None:
        if fmt not in ("npy", "npz"):
            raise ValueError(f"a {fmt} output is not written at offsets")
        self.path, self.fmt, self.rows, self.temp = path, fmt, rows, temp
        self._fd = -1
        self._members: list[_Member] = []
        self._schema: pa.Schema | None = None
        self._end = 0
        self.written = self.rejected = 0

    @property
    def schema(self) -> pa.Schema | None:
        """The columns the layout was made for; None until the first chunk with scored rows."""
        return self._schema

    def accepts(self, schema: pa.Schema | None) -> bool:
        """Whether chunks of this schema can be written at offsets: every column has a fixed width (text ids do
        not until every row is seen; the caller then discards the stream and assembles the output from the parts)."""
        if schema is None:
            return True
        return all(fixed_dtype(schema.field(n).type) is not None for n in self._names(schema))

    def _names(self, schema: pa.Schema) -> list[str]:
        return list(schema.names[1:] if self.fmt == "npy" else schema.names)  # a .npy output holds no ids

    def _layout(self, schema: pa.Schema) -> None:
        self._schema, self._members = schema, []
        shapes, at = row_shapes(schema), 0
        for name in self._names(schema):
            dtype = fixed_dtype(schema.field(name).type)
            if dtype is None:
                raise ValueError(f"column {name!r} has no fixed width: it cannot be written at offsets")
            shape = shapes[name]
            header = npy_header(dtype, (self.rows, *shape))
            zip_name = f"{name}.npy".encode() if self.fmt == "npz" else b""
            data_at = at + (_LOCAL.size + len(zip_name) + 20 if self.fmt == "npz" else 0) + len(header)
            member = _Member(name, dtype, shape, dtype.itemsize * int(np.prod(shape)), header, zip_name, at, data_at,
                             zlib.crc32(header))
            self._members.append(member)
            at = data_at + self.rows * member.row_bytes
        self._end = at

    def _open(self, schema: pa.Schema) -> None:
        self._layout(schema)
        self._fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        os.fchmod(self._fd, 0o640)
        os.ftruncate(self._fd, self._end)

    def state(self) -> dict[str, Any]:
        """What a chunk's commit records, for ``reopen`` (the rows so far and each member's CRC-32 so far)."""
        return {"written": self.written, "rejected": self.rejected, "crc": [m.crc for m in self._members]}

    def reopen(self, schema: pa.Schema, state: dict[str, Any]) -> None:
        """Go on with the file an interrupted run left, from its last commit (bytes past it are written again)."""
        self._layout(schema)
        try:
            fd = os.open(self.temp, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ValueError(f"--resume: the output in progress {self.temp} is missing; delete the folder "
                             f"{self.temp.parent} to start over") from None
        if len(state["crc"]) != len(self._members) or os.fstat(fd).st_size < max(
                m.data_at + int(state["written"]) * m.row_bytes for m in self._members):
            os.close(fd)
            raise ValueError(f"--resume: the output in progress {self.temp} does not hold the rows its commits "
                             f"record; delete the folder {self.temp.parent} to start over")
        # a run stopped while sealing left a tail past the layout (a .npz) or cut it short (a .npy with rejects,
        # never below the rows committed): back to the layout, the seal is written again
        os.ftruncate(fd, self._end)
        self._fd, self.written, self.rejected = fd, int(state["written"]), int(state["rejected"])
        for m, crc in zip(self._members, state["crc"], strict=True):
            m.crc = int(crc)

    def write(self, batch: pa.RecordBatch | None, rejected: int = 0) -> None:
        """The next chunk's scored rows (None: it had none) and the count of its rows left out."""
        self.rejected += rejected
        if batch is None or not batch.num_rows:
            return
        if self._schema is None:
            self._open(batch.schema)
        elif not batch.schema.equals(self._schema, check_metadata=False):
            raise ValueError(f"a chunk's columns changed from {self._schema} to {batch.schema}")
        if self.written + batch.num_rows + self.rejected > self.rows:
            raise ValueError(f"more rows than the {self.rows:,} the input holds")
        for m in self._members:
            col = batch.column(m.name)
            values = np.ascontiguousarray(np.asarray(numpy_of(col.flatten() if m.shape else col), dtype=m.dtype))
            data = values.reshape(-1).view(np.uint8).data
            m.crc = zlib.crc32(data, m.crc)
            _pwrite(self._fd, data, m.data_at + self.written * m.row_bytes)
        self.written += batch.num_rows

    def commit(self) -> None:
        """Put what was written on disk: the chunk's commit record may follow (called on the writer thread)."""
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def close(self, schema: pa.Schema) -> None:
        """Finish the output (``schema`` lays out an output no row reached): ``seal`` then ``publish``."""
        self.publish(self.seal(schema))

    def seal(self, schema: pa.Schema) -> Path:
        """Write the headers, the central directory and the end records; the file that holds the whole output,
        fsynced (``temp``, or its tight copy), for ``publish``. A run stopped here resumes from its last commit:
        ``reopen`` cuts the file back to its layout, and the bytes written here are written again."""
        if self._schema is None:
            self._open(schema)
        if self.written + self.rejected != self.rows:
            raise ValueError(f"the input held {self.rows:,} rows but {self.written + self.rejected:,} were read")
        done = self.temp
        if self.fmt == "npy":
            (m,) = self._members
            if self.written < self.rows:  # rows were rejected: the array ends after the rows scored
                m.header = npy_header(m.dtype, (self.written, *m.shape), size=len(m.header))
                os.ftruncate(self._fd, m.data_at + self.written * m.row_bytes)
            _pwrite(self._fd, memoryview(m.header), 0)
        elif self.written < self.rows:  # rejected rows leave a gap after each member: copied into a tight file
            done = self._compacted()
        else:
            self._finish_zip(self._fd, self._members, self.rows)
        if done == self.temp:
            os.fsync(self._fd)
        self.release()
        return done

    def publish(self, sealed: Path) -> None:
        """The sealed file becomes the output (renamed, its folder fsynced)."""
        os.replace(sealed, self.path)
        fsync_dir(self.path.parent)
        self.temp.unlink(missing_ok=True)

    def _compacted(self) -> Path:
        """A copy of the archive with each member cut to the rows scored (the rare path: a .npz with rejects),
        fsynced; removed again if it cannot be made whole."""
        tight = self.temp.with_name(self.temp.name + ".tight")
        out = os.open(tight, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.fchmod(out, 0o640)
            members, at = [], 0
            with mmap.mmap(self._fd, 0, prot=mmap.PROT_READ) as src:
                for m in self._members:
                    header = npy_header(m.dtype, (self.written, *m.shape))
                    data_at = at + _LOCAL.size + len(m.zip_name) + 20 + len(header)
                    data = memoryview(src)[m.data_at : m.data_at + self.written * m.row_bytes]
                    try:
                        tight_m = _Member(m.name, m.dtype, m.shape, m.row_bytes, header, m.zip_name, at, data_at,
                                          zlib.crc32(data, zlib.crc32(header)))
                        _pwrite(out, data, data_at)
                    finally:
                        data.release()
                    members.append(tight_m)
                    at = data_at + self.written * m.row_bytes
            self._finish_zip(out, members, self.written, at)
            os.fsync(out)
        except BaseException:
            os.close(out)
            tight.unlink(missing_ok=True)
            raise
        os.close(out)
        return tight

    def _finish_zip(self, fd: int, members: list[_Member], rows: int, end: int | None = None) -> None:
        """Each member's headers (which hold its size and CRC-32), the central directory and the end records."""
        central = b""
        for m in members:
            size = len(m.header) + rows * m.row_bytes
            _pwrite(fd, memoryview(m.local_header(size) + m.header), m.header_at)
            central += m.central_entry(size)
        n, at = len(members), self._end if end is None else end
        end64 = _END64.pack(0x06064B50, _END64.size - 12, (3 << 8) | _VERSION, _VERSION, 0, 0, n, n, len(central), at)
        tail = (central + end64 + _LOCATOR.pack(0x07064B50, 0, at + len(central), 1)
                + _END.pack(0x06054B50, 0, 0, min(n, _MAX16), min(n, _MAX16), min(len(central), _MAX32),
                            min(at, _MAX32), 0))
        _pwrite(fd, memoryview(tail), at)

    def release(self) -> None:
        """The run stops: the file stays in the work folder for --resume, up to its last commit."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """The output will be assembled from the parts instead: the file goes."""
        self.release()
        self.temp.unlink(missing_ok=True)


def _pwrite(fd: int, data: memoryview, at: int) -> None:
    while data:
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n
