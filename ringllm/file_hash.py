"""The SHA-256 of a whole file, computed once and remembered by the file's identity.

Peers compare their model file's hash at the handshake (it is the model fingerprint), so a
file that differs in any byte (weights included) is refused. Hashing runs at
``hashlib``'s speed (it releases the GIL): on the test box SHA-256 (the CPU has SHA extensions)
runs about twice as fast as BLAKE2b (bench/model_hash.py, docs/performance.md), so SHA-256 it is,
and the fingerprint is then the same number as ring.toml's ``model_sha256`` and ``sha256sum``.

A file of at least :data:`CACHE_MIN` bytes is hashed once; later opens read the answer from
``<cache_dir>/hashes/<sha256 of the resolved path, 32 hex>.json``::

    {"v": 1, "path": "/abs/model.gguf", "dev": 2049, "inode": 1234, "size": 98000000,
     "mtime_ns": 1700000000000000000, "ctime_ns": 1700000000000000000, "sha256": "<64 hex>"}

An entry is believed only when every one of path, device, inode, size, mtime_ns and ctime_ns
equals an ``fstat`` of the file just opened. Writing a file changes its mtime and ctime;
``touch -d``/``os.utime`` can put the mtime back but sets the ctime to now, which no
unprivileged process can forge; a replaced file has a new inode. An entry that does not parse,
has a field of the wrong type or a malformed hash is ignored (the file is hashed again and the
entry rewritten). Entries are written to a temporary file and renamed, so a crash leaves the
old entry or the new one, never half of one; a file that changed while it was being hashed
is not cached. Processes hashing the same file at once (the peers of a local ring) take turns
on a ``<entry>.lock`` flock, so the file is hashed once. A cache directory that cannot be
written is not an error: the hash is then computed at every start.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ringllm.paths import cache_dir

# Below this a file is hashed at every open (16 MiB: under 0.1 s even on the busy box) and kept out of the
# cache, so test runs' throwaway synthetic models do not pile up entries there.
CACHE_MIN = 16 * 2**20
_CHUNK = 4 * 2**20  # read size: large enough that the per-call overhead vanishes, small enough to stay in L3
_FIELDS = ("path", "dev", "inode", "size", "mtime_ns", "ctime_ns")


def file_sha256(path: str | os.PathLike[str], *, cache_min: int = CACHE_MIN) -> str:
    """The hex SHA-256 of the file at ``path``, from the cache when the file is unchanged."""
    real = os.path.realpath(path)
    with open(real, "rb") as f:
        st = os.fstat(f.fileno())
        key = _identity(real, st)
        if st.st_size < cache_min:
            return _hash(f)
        entry = _entry_path(real)
        if (known := _read_entry(entry, key)) is not None:
            return known
        with _locked(entry):  # the peers of a local ring starting together hash the file once
            if (known := _read_entry(entry, key)) is not None:
                return known
            digest = _hash(f)
            if _identity(real, os.fstat(f.fileno())) == key:
                _write_entry(entry, {**key, "sha256": digest})
    return digest


def remember(path: str | os.PathLike[str], sha256: str, *, cache_min: int | None = None) -> None:
    """Record ``sha256`` as the hash of the file at ``path`` as it is now, as if
    :func:`file_sha256` had just computed it: for a caller that hashed the bytes itself while
    writing them (``ringllm pull`` verifies a model as it assembles it), so the first start
    does not read the whole file again. The caller vouches for the digest; the entry holds the
    file's identity, so any later change to the file is noticed as usual. ValueError for a
    digest that is not 64 lower-case hex digits."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    real = os.path.realpath(path)
    st = os.stat(real)
    if st.st_size < (CACHE_MIN if cache_min is None else cache_min):
        return
    entry = _entry_path(real)
    with _locked(entry):
        _write_entry(entry, {**_identity(real, st), "sha256": sha256})


def _hash(f: BinaryIO) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


@contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """An exclusive flock on ``<entry>.lock`` (none if the cache cannot be written)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = open(entry.with_suffix(".lock"), "a")
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _identity(real: str, st: os.stat_result) -> dict[str, object]:
    return {"path": real, "dev": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _entry_path(real: str) -> Path:
    return cache_dir() / "hashes" / (hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".json")


def _read_entry(entry: Path, key: dict[str, object]) -> str | None:
    """The cached hash if ``entry`` is well formed and describes the file ``key`` names."""
    try:
        doc = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("v") != 1 or any(type(doc.get(k)) is not type(key[k]) or doc.get(k) != key[k] for k in _FIELDS):
        return None
    sha = doc.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        return None
    return sha


def _write_entry(entry: Path, doc: dict[str, object]) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"v": 1, **doc}, f)
            os.replace(tmp, entry)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only cache: hash again next time
