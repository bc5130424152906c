"""A strict, lean GGUF parser over a read-only memory map.

Why not ``gguf.GGUFReader``: it builds a numpy view for every metadata element (≈300,000 for
a 49k-token vocabulary), which costs SmolLM2 ~160 MB of RSS and ~6 s before the first weight
is read. This parser reads the same structure with ``struct`` (arrays of numbers with one
``np.frombuffer``), keeps tensor data as zero-copy views of one ``mmap``, and can hand pages
back to the OS once a tensor has been copied (:meth:`GGUFFile.release`). The tests check it
against ``GGUFReader`` field by field.

File layout (little-endian, GGUF v2/v3)::

    u32 magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x  { string key | u32 value_type | value }
    n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
    padding to general.alignment (default 32)
    tensor data: tensor i at data_start + offset_i
    string = u64 length | utf-8 bytes;  array value = u32 elem_type | u64 count | elems
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ringllm.errors import ModelError, UnsupportedError

# GGUF value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"), 5: ("<i", "<i4"),
    6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_MAX_DIMS = 4


@dataclass(frozen=True)
class RawTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # ne order: shape[0] is the contiguous dimension
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (python values), ``tensors`` (name -> RawTensor).

    Raises :class:`ModelError` naming the problem for anything malformed or truncated, and
    :class:`UnsupportedError` for a tensor type unknown to the ``gguf`` package.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size == 0:
                raise ModelError(f"{self.path} is empty")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):
            # No readahead on faults: a peer reads a quarter of a tensor's rows, and the kernel's
            # readahead (8 MB windows on the bench VM) would read the other peers' rows too.
            # Loaders say what they will read with prefetch() instead. Measured, qwen2.5-coder-
            # 1.5b rank 0 of 4 from a cold cache: 832 MB read in 2.9-3.3 s without either,
            # 461 MB in 5.8-6.1 s with MADV_RANDOM alone (docs/performance.md).
            self._mm.madvise(mmap.MADV_RANDOM)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError, OverflowError) as exc:
            self.close()
            raise ModelError(f"{self.path}: malformed GGUF structure at byte {self._pos}: {exc}") from None
        except BaseException:
            self.close()
            raise

    # -- structure ---------------------------------------------------------------------------
    def _parse(self) -> None:
        magic, version = struct.unpack_from("<4sI", self._take(8), 0)
        if magic != b"GGUF":
            raise ModelError(f"{self.path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        if version not in (2, 3):
            raise ModelError(f"{self.path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", self._take(16), 0)
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ModelError(f"{self.path}: implausible header ({n_tensors} tensors, {n_kv} metadata keys)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(struct.unpack_from("<I", self._take(4), 0)[0], key)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = struct.unpack_from("<I", self._take(4), 0)
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ModelError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
            shape = struct.unpack_from(f"<{n_dims}Q", self._take(8 * n_dims), 0)
            qtype_id, offset = struct.unpack_from("<IQ", self._take(12), 0)
            infos.append((name, shape, qtype_id, offset))
        align = int(self.metadata.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise ModelError(f"{self.path}: general.alignment {align} is not a power of two")
        data_start = -(-self._pos // align) * align
        self.tensors: dict[str, RawTensor] = {}
        for name, shape, qtype_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(qtype_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise UnsupportedError(f"{os.path.basename(self.path)}: tensor {name!r} has unknown type id {qtype_id}") from None
            n = int(np.prod(shape, dtype=np.uint64))
            if shape[0] % block:
                raise ModelError(f"{self.path}: tensor {name!r} row of {shape[0]} values is not whole {qtype.name} blocks")
            nbytes = n // block * type_size
            start = data_start + offset
            if start + nbytes > self.size:
                raise ModelError(f"{self.path} is truncated: tensor {name!r} ends at byte {start + nbytes} "
                                 f"but the file has {self.size} bytes")
            if name in self.tensors:
                raise ModelError(f"{self.path}: tensor {name!r} appears twice")
            self.tensors[name] = RawTensor(name, qtype, tuple(int(s) for s in shape), start, nbytes)
        # The header (SmolLM2: 1.7 MB, mostly the vocabulary) has been read into Python values.
        if data_start >= mmap.PAGESIZE and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, 0, data_start // mmap.PAGESIZE * mmap.PAGESIZE)

    def _take(self, n: int) -> memoryview:
        if self._pos + n > self.size:
            raise ModelError(f"{self.path} is truncated: the header needs byte {self._pos + n} but the file has {self.size}")
        view = memoryview(self._mm)[self._pos : self._pos + n]
        self._pos += n
        return view

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._take(8), 0)
        return bytes(self._take(n)).decode("utf-8")

    def _value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            fmt, _ = _SCALARS[vtype]
            (v,) = struct.unpack_from(fmt, self._take(struct.calcsize(fmt)), 0)
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", self._take(12), 0)
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype][1])
                arr = np.frombuffer(self._take(count * dt.itemsize), dt)
                return [bool(x) for x in arr] if etype == _BOOL else arr.tolist()
            if etype == _STRING:
                return [self._string() for _ in range(count)]
            if etype == _ARRAY:
                return [self._value(_ARRAY, key) for _ in range(count)]
            raise ModelError(f"{self.path}: metadata {key!r} is an array of unknown type {etype}")
        raise ModelError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")

    # -- data --------------------------------------------------------------------------------
    def data(self, t: RawTensor) -> np.ndarray:
        """Zero-copy uint8 view of a tensor's bytes (read-only; valid until :meth:`close`)."""
        return np.frombuffer(self._mm, np.uint8, count=t.nbytes, offset=t.offset)

    def prefetch(self, t: RawTensor, lo: int = 0, hi: int | None = None) -> None:
        """Start reading the pages of the tensor's bytes [lo, hi) (default: all) from disk now,
        in large requests (the map itself does no readahead, see ``__init__``)."""
        self._advise(getattr(mmap, "MADV_WILLNEED", None), t, lo, hi)

    def release(self, t: RawTensor, lo: int = 0, hi: int | None = None) -> None:
        """Hand the pages of the tensor's bytes [lo, hi) (default: all) back to the OS; they stay
        in the page cache, not in our RSS.

        Call after those bytes were copied; later reads of them fault the pages in again.
        """
        self._advise(mmap.MADV_DONTNEED, t, lo, hi)

    def _advise(self, advice: int | None, t: RawTensor, lo: int, hi: int | None) -> None:
        hi = t.nbytes if hi is None else min(hi, t.nbytes)
        page = mmap.PAGESIZE
        start = (t.offset + lo) // page * page
        end = min(self.size, -(-(t.offset + hi) // page) * page)
        if advice is not None and end > start and hasattr(self._mm, "madvise"):
            self._mm.madvise(advice, start, end - start)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass  # views are still alive; the map goes when they do

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
