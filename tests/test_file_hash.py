"""The whole-file SHA-256 and its cache (ringllm.file_hash): the hash is the file's, a cache
entry is believed only for the very file it describes, and a bad entry is never believed.

Every test points the ringllm cache at a temporary directory and caches files of any size
(``cache_min=0``). "Served from the cache" is shown by planting an entry with a made-up hash
for the file's exact identity: only a lookup can return it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ringllm import file_hash
from ringllm.file_hash import file_sha256

FAKE = "f" * 64


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RINGLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hashes"


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(os.urandom(3 * 2**20 + 17))  # not a multiple of the read size
    return path


def _entry(cache: Path) -> Path:
    entries = list(cache.glob("*.json"))
    assert len(entries) == 1, entries
    return entries[0]


def _plant(cache: Path, **changes) -> None:
    """Rewrite the one cache entry with a made-up hash (and any field changed)."""
    e = _entry(cache)
    doc = json.loads(e.read_text())
    doc.update({"sha256": FAKE, **changes})
    e.write_text(json.dumps(doc))


def test_the_hash_is_sha256_of_every_byte_and_is_cached_for_that_file(model, cache):
    want = hashlib.sha256(model.read_bytes()).hexdigest()
    assert file_sha256(model, cache_min=0) == want
    doc = json.loads(_entry(cache).read_text())
    st = model.stat()
    assert doc == {"v": 1, "path": str(model.resolve()), "dev": st.st_dev, "inode": st.st_ino, "size": st.st_size,
                   "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "sha256": want}
    _plant(cache)
    assert file_sha256(model, cache_min=0) == FAKE  # the unchanged file is answered from the entry
    assert file_sha256(str(model), cache_min=0) == FAKE


def test_a_middle_byte_changed_in_place_with_the_mtime_put_back_is_hashed_again(model, cache):
    file_sha256(model, cache_min=0)
    _plant(cache)
    st = model.stat()
    with open(model, "r+b") as f:  # same inode, same size
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as before; ctime moves on
    assert (model.stat().st_ino, model.stat().st_size, model.stat().st_mtime_ns) == (st.st_ino, st.st_size,
                                                                                      st.st_mtime_ns)
    got = file_sha256(model, cache_min=0)
    assert got == hashlib.sha256(model.read_bytes()).hexdigest() != FAKE


def test_a_replaced_file_of_the_same_size_and_mtime_is_hashed_again(model, cache, tmp_path):
    file_sha256(model, cache_min=0)
    _plant(cache)
    st = model.stat()
    other = tmp_path / "other"
    other.write_bytes(os.urandom(st.st_size))
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, model)  # same path, size and mtime; a new inode
    assert file_sha256(model, cache_min=0) == hashlib.sha256(model.read_bytes()).hexdigest() != FAKE


@pytest.mark.parametrize("field,value", [("size", 1), ("mtime_ns", 0), ("ctime_ns", 0), ("inode", 0), ("dev", 0),
                                         ("path", "/elsewhere/m.gguf"), ("v", 2), ("size", "3145745"),
                                         ("inode", True), ("sha256", "F" * 64), ("sha256", "f" * 63), ("sha256", None)])
def test_an_entry_that_does_not_describe_this_file_exactly_is_not_believed(model, cache, field, value):
    good = file_sha256(model, cache_min=0)
    _plant(cache, **{field: value})
    assert file_sha256(model, cache_min=0) == good
    assert json.loads(_entry(cache).read_text())["sha256"] == good  # and the entry is rewritten


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"[]", b"null", b'{"v": 1}', b"\xff\xfe{", b"\x00" * 300])
def test_a_corrupt_entry_is_recomputed(model, cache, data):
    good = file_sha256(model, cache_min=0)
    _entry(cache).write_bytes(data)
    assert file_sha256(model, cache_min=0) == good
    assert json.loads(_entry(cache).read_text())["sha256"] == good


def test_small_files_stay_out_of_the_cache_and_a_read_only_cache_is_no_error(model, cache):
    assert file_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest()  # 3 MiB < CACHE_MIN
    assert not cache.exists()
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the directory should be")  # nothing can be written under it
    assert file_sha256(model, cache_min=0) == hashlib.sha256(model.read_bytes()).hexdigest()
    assert file_hash.CACHE_MIN > model.stat().st_size


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        file_sha256(tmp_path / "nope.gguf")


def test_concurrent_starts_hash_the_file_once(model, cache, monkeypatch):
    """Three peers of a local ring opening the same new file at once: one hashes, two wait and
    read its entry (the hash is slowed so that all three miss the cache without the lock)."""
    import threading
    import time

    calls = []
    real_hash = file_hash._hash

    def slow_hash(f):
        calls.append(1)
        time.sleep(0.3)
        return real_hash(f)

    monkeypatch.setattr(file_hash, "_hash", slow_hash)
    out: list[str] = []
    threads = [threading.Thread(target=lambda: out.append(file_sha256(model, cache_min=0))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [hashlib.sha256(model.read_bytes()).hexdigest()] * 3
    assert len(calls) == 1


def test_remember_seeds_the_cache_for_the_file_as_it_is(model, cache):
    """What ``ringllm pull`` does after verifying a model: the first start then reads the
    digest from the entry, not the file; a changed file is hashed again."""
    file_hash.remember(model, FAKE, cache_min=0)
    assert file_sha256(model, cache_min=0) == FAKE  # only the entry can say FAKE
    with open(model, "r+b") as f:
        f.write(b"\0")
    want = hashlib.sha256(model.read_bytes()).hexdigest()
    assert file_sha256(model, cache_min=0) == want


def test_remember_refuses_a_malformed_digest_and_skips_small_files(model, cache):
    with pytest.raises(ValueError, match="SHA-256"):
        file_hash.remember(model, "F" * 64, cache_min=0)
    file_hash.remember(model, FAKE)  # below CACHE_MIN: nothing written
    assert not cache.exists() or not list(cache.glob("*.json"))
