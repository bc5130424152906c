"""ring.toml: the ring's topology and shared settings, parsed once into frozen dataclasses.

Every error names the file, the field and (for peer entries) the peer index, e.g.
``ring.toml: peer[2].port: must be an integer in 1..65535, got 'abc'``.

    name = "home"                 # ring name, checked at the handshake
    model = "smollm2-135m"        # known model name or GGUF path (each peer may override)
    model_sha256 = "b179..."      # optional: every peer verifies its file against it
    wire = "f32"                  # or "q8_0": activations compressed on the wire
    kernels = "auto"              # or "numba" / "numpy": every peer must end up with the same
    secret = "..."                # or secret_file = "path", or secret_env = "VAR"
    context_length = 4096         # optional cap on the model's context
    heartbeat_interval = 1.0      # seconds between pings on an idle link
    dead_after = 5.0              # a link silent this long is lost
    max_queue = 64                # requests waiting beyond the running batch before 429
    max_batch = 16                # sequences in one forward step

    [http]                        # optional: the OpenAI-compatible API on every peer
    host = "127.0.0.1"
    api_key = "..."               # optional bearer key (or api_key_env)
    header_timeout = 10.0         # seconds to deliver a request's headers (also the keep-alive idle limit)
    body_timeout = 15.0           # seconds to deliver a request's body
    max_connections = 256         # HTTP connections open at once; one more gets a 503

    [tls]                         # optional: TLS on peer links (and HTTP)
    cert = "peer.crt"
    key = "peer.key"
    ca = "ca.crt"

    [[peer]]                      # in ring order; rank = position
    host = "127.0.0.1"
    port = 7700
    http_port = 8700              # optional (default port + 1000)
    weight = 1.0                  # optional capacity weight
    model = "/path/model.gguf"    # optional per-peer path to the same model
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ringllm.errors import ConfigError

WIRE_FORMATS = ("f32", "q8_0")
# The kernel families of ringllm.ops.kernels.FAMILIES (a test keeps the two equal; the ring
# layer does not import the compute layer).
KERNEL_FAMILIES = ("auto", "numba", "numpy")
# HTTP limits (ringllm.http.serve), per peer. A real client sends its headers in one packet and
# a prompt's body (at most the context, tens of kB) in well under a second; these bound what a
# slowloris client holds: headers 10 s, body 15 s, plus at most 2 s of lingering after the 408,
# so a connection that never completes a request is closed within 27 s of opening.
HTTP_HEADER_TIMEOUT = 10.0
HTTP_BODY_TIMEOUT = 15.0
# A connection costs one file descriptor; a peer's default soft limit is 1024 fds (ulimit -n),
# of which the model, the ring's links and the listeners use a few dozen. 256 leaves room and
# is far above what the request queue admits (max_batch + max_queue = 80 by default).
HTTP_MAX_CONNECTIONS = 256


@dataclass(frozen=True)
class PeerConfig:
    rank: int
    host: str
    port: int
    http_port: int
    weight: float = 1.0
    model: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class RingConfig:
    name: str
    model: str
    secret: bytes
    peers: tuple[PeerConfig, ...]
    model_sha256: str | None = None
    wire: str = "f32"
    kernels: str = "auto"
    context_length: int | None = None
    heartbeat_interval: float = 1.0
    dead_after: float = 5.0
    max_queue: int = 64
    max_batch: int = 16
    http_host: str = "127.0.0.1"
    api_key: str | None = None
    http_header_timeout: float = HTTP_HEADER_TIMEOUT
    http_body_timeout: float = HTTP_BODY_TIMEOUT
    http_max_connections: int = HTTP_MAX_CONNECTIONS
    tls: TlsConfig | None = None
    source: str = "ring.toml"

    @property
    def size(self) -> int:
        return len(self.peers)

    @property
    def weights(self) -> list[float]:
        return [p.weight for p in self.peers]

    def peer(self, rank: int) -> PeerConfig:
        if not 0 <= rank < self.size:
            raise ConfigError(f"{self.source}: rank {rank} is out of range: the ring has {self.size} peers (ranks 0..{self.size - 1})")
        return self.peers[rank]

    def model_for(self, rank: int) -> str:
        return self.peer(rank).model or self.model

    def http_address(self, rank: int) -> str:
        """Where to reach peer ``rank``'s HTTP API from this machine, as ``host:port``: at
        ``[http] host`` when that is one address and the peer runs on this machine (its ring
        host is one of ours), else at its ring host (the only address of another machine
        ring.toml names; with a loopback ``[http] host`` that peer answers only at home)."""
        p, host = self.peer(rank), self.http_host
        if host in WILDCARD_HOSTS or not is_this_machine(p.host):
            host = p.host
        return f"[{host}]:{p.http_port}" if ":" in host else f"{host}:{p.http_port}"


class _Fields:
    """Typed reads from one TOML table; errors name the file and the field path."""

    def __init__(self, source: str, prefix: str, table: dict[str, Any]) -> None:
        self.source, self.prefix, self.table = source, prefix, table

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}: {msg}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, check=None, desc: str = "") -> Any:
        if key not in self.table:
            if default is ...:
                raise self.fail(key, "is required")
            return default
        v = self.table[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise self.fail(key, f"must be {desc or _kind_name(kind)}, got {v!r}")
        if check is not None and not check(v):
            raise self.fail(key, f"must be {desc}, got {v!r}")
        return v

    def unknown(self, allowed: set[str]) -> None:
        extra = sorted(set(self.table) - allowed)
        if extra:
            raise self.fail(extra[0], f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _kind_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "a table"}
    return names.get(kind, str(kind))


def load_ring(path: str | os.PathLike[str]) -> RingConfig:
    """Read and validate a ring.toml file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"ring file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read ring file {p}: {exc.strerror}") from None
    return parse_ring(text, source=str(p), base=p.parent)


def parse_ring(text: str, *, source: str = "ring.toml", base: Path = Path(".")) -> RingConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    top = _Fields(source, "", doc)
    top.unknown({"name", "model", "model_sha256", "wire", "kernels", "secret", "secret_file", "secret_env", "context_length",
                 "heartbeat_interval", "dead_after", "max_queue", "max_batch", "http", "tls", "peer"})
    name = top.get("name", str, check=lambda s: 0 < len(s) <= 64, desc="a non-empty string of at most 64 characters")
    model = top.get("model", str, "smollm2-135m", check=bool, desc="a non-empty model name or path")
    sha = top.get("model_sha256", str, None, check=lambda s: len(s) == 64 and all(c in "0123456789abcdef" for c in s),
                  desc="64 lowercase hex digits")
    wire = top.get("wire", str, "f32", check=lambda s: s in WIRE_FORMATS, desc=f"one of {', '.join(WIRE_FORMATS)}")
    kernels = top.get("kernels", str, "auto", check=lambda s: s in KERNEL_FAMILIES,
                      desc=f"one of {', '.join(KERNEL_FAMILIES)}")
    secret = _secret(top, base)
    positive = dict(check=lambda x: x > 0, desc="a positive number")
    ctx = top.get("context_length", int, None, check=lambda x: x > 0, desc="a positive integer")
    hb = top.get("heartbeat_interval", float, 1.0, **positive)
    dead = top.get("dead_after", float, 5.0, **positive)
    if dead <= hb:
        raise top.fail("dead_after", f"must be greater than heartbeat_interval ({hb}), got {dead}")
    max_queue = top.get("max_queue", int, 64, check=lambda x: x >= 0, desc="an integer >= 0")
    max_batch = top.get("max_batch", int, 16, check=lambda x: x >= 1, desc="an integer >= 1")

    http = _Fields(source, "http.", top.get("http", dict, {}))
    http.unknown({"host", "api_key", "api_key_env", "header_timeout", "body_timeout", "max_connections"})
    header_timeout = http.get("header_timeout", float, HTTP_HEADER_TIMEOUT, check=lambda x: 0 < x <= 3600,
                              desc="a number of seconds in (0, 3600]")
    body_timeout = http.get("body_timeout", float, HTTP_BODY_TIMEOUT, check=lambda x: 0 < x <= 3600,
                            desc="a number of seconds in (0, 3600]")
    max_connections = http.get("max_connections", int, HTTP_MAX_CONNECTIONS, check=lambda x: x >= 1,
                               desc="an integer >= 1")
    http_host = http.get("host", str, "127.0.0.1", check=bool, desc="a host name or address")
    api_key = http.get("api_key", str, None, check=bool, desc="a non-empty string")
    if env := http.get("api_key_env", str, None):
        api_key = os.environ.get(env) or _raise(http.fail("api_key_env", f"environment variable {env} is not set"))

    tls = None
    if "tls" in doc:
        t = _Fields(source, "tls.", top.get("tls", dict))
        t.unknown({"cert", "key", "ca"})
        files = {k: (base / t.get(k, str)).resolve() for k in ("cert", "key", "ca")}
        for k, f in files.items():
            if not f.is_file():
                raise t.fail(k, f"file {f} does not exist")
        tls = TlsConfig(**files)

    raw_peers = top.get("peer", list, desc="an array of [[peer]] tables")
    if not raw_peers:
        raise top.fail("peer", "the ring needs at least one [[peer]]")
    peers = []
    seen: dict[tuple[str, int], int] = {}
    for i, entry in enumerate(raw_peers):
        if not isinstance(entry, dict):
            raise top.fail(f"peer[{i}]", "must be a table")
        f = _Fields(source, f"peer[{i}].", entry)
        f.unknown({"host", "port", "http_port", "weight", "model"})
        host = f.get("host", str, check=bool, desc="a host name or address")
        port = f.get("port", int, check=lambda x: 1 <= x <= 65535, desc="an integer in 1..65535")
        http_port = f.get("http_port", int, port + 1000 if port + 1000 <= 65535 else port - 1000,
                          check=lambda x: 1 <= x <= 65535, desc="an integer in 1..65535")
        weight = f.get("weight", float, 1.0, check=lambda x: 0 < x < 1e6, desc="a positive number")
        model_path = f.get("model", str, None, check=bool, desc="a non-empty path")
        for key, prt in (("port", port), ("http_port", http_port)):
            if (host, prt) in seen:
                raise f.fail(key, f"{host}:{prt} is already used by peer[{seen[(host, prt)]}]")
            seen[(host, prt)] = i
        peers.append(PeerConfig(i, host, port, http_port, weight, model_path))
    return RingConfig(name=name, model=model, secret=secret, peers=tuple(peers), model_sha256=sha, wire=wire, kernels=kernels,
                      context_length=ctx, heartbeat_interval=hb, dead_after=dead, max_queue=max_queue,
                      max_batch=max_batch, http_host=http_host, api_key=api_key, http_header_timeout=header_timeout,
                      http_body_timeout=body_timeout, http_max_connections=max_connections, tls=tls, source=source)


def _raise(exc: Exception) -> Any:
    raise exc


def _secret(top: _Fields, base: Path) -> bytes:
    given = [k for k in ("secret", "secret_file", "secret_env") if k in top.table]
    if len(given) != 1:
        raise top.fail("secret", "give exactly one of secret, secret_file, secret_env" +
                       (f" (found {', '.join(given)})" if given else ""))
    key = given[0]
    if key == "secret":
        value = top.get("secret", str)
    elif key == "secret_file":
        path = base / top.get("secret_file", str)
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise top.fail("secret_file", f"cannot read {path}: {exc.strerror}") from None
    else:
        var = top.get("secret_env", str)
        value = os.environ.get(var, "")
        if not value:
            raise top.fail("secret_env", f"environment variable {var} is not set or empty")
    if len(value) < 16:
        raise top.fail(key, f"the secret must be at least 16 characters (got {len(value)})")
    return value.encode()


WILDCARD_HOSTS = ("0.0.0.0", "::")  # bind addresses meaning every interface


def is_loopback(host: str) -> bool:
    """True when ``host`` is reached only from this machine: ``localhost``, 127.0.0.0/8, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=64)
def is_this_machine(host: str) -> bool:
    """True when ``host`` (a name or address) is one of this machine's addresses: loopback, or
    an address a socket here can bind (another machine's address cannot be bound)."""
    if is_loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    for family, kind, _, _, addr in infos:
        try:
            with socket.socket(family, kind) as s:
                s.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (bound and released by the OS)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# `ring init --hosts` without --base-port: the port the user guide's LAN example uses.
DEFAULT_BASE_PORT = 7700


def init_ring_toml(peers: int, *, name: str = "local", model: str = "smollm2-135m", wire: str = "f32",
                   host: str = "127.0.0.1", model_sha256: str | None = None, hosts: Sequence[str] | None = None,
                   base_port: int | None = None, http_base_port: int | None = None,
                   http_ports: Sequence[int] | None = None, kernels: str = "auto") -> str:
    """The text of a ready ring.toml: one peer per entry of ``hosts`` (default: ``peers`` on
    ``host``) and a fresh random secret; ``kernels`` is written when not ``auto``.

    Ports: with ``base_port``, the k-th peer on a host gets ring port ``base_port + k`` and HTTP
    port ``http_base_port + k``, or, without that, the first port after the host's ring ports
    (``base_port + n + k`` for n peers on the host). Without ``base_port``: free ports of this
    machine (``hosts`` given: DEFAULT_BASE_PORT). ``http_ports`` sets every peer's HTTP port
    (ring ports: free ones). The result is parsed before it is returned, so a clash (e.g. HTTP
    ports overlapping ring ports) is a ConfigError naming the peer."""
    if peers < 1:
        raise ConfigError(f"--peers must be at least 1, got {peers}")
    if hosts is not None:
        if len(hosts) != peers or not all(hosts):
            raise ConfigError(f"--hosts must name {peers} non-empty hosts, got {list(hosts)}")
        base_port = DEFAULT_BASE_PORT if base_port is None else base_port
    hosts = list(hosts) if hosts is not None else [host] * peers
    if base_port is None and http_base_port is not None:
        raise ConfigError("--http-base-port needs --base-port (or --hosts)")
    if http_ports is not None:
        ports, https = free_ports(peers, host), list(http_ports)
    elif base_port is None:
        free = free_ports(2 * peers, host)
        ports, https = free[0::2], free[1::2]
    else:
        ports, https = _ports_per_host(hosts, base_port, http_base_port)
    lines = [
        f'name = "{name}"',
        f'model = "{model}"',
        *([f'model_sha256 = "{model_sha256}"'] if model_sha256 else []),
        f'wire = "{wire}"',
        *([f'kernels = "{kernels}"'] if kernels != "auto" else []),
        f'secret = "{secrets.token_hex(24)}"',
        "",
    ]
    for r in range(peers):
        lines += ["[[peer]]", f'host = "{hosts[r]}"', f"port = {ports[r]}", f"http_port = {https[r]}",
                  "weight = 1.0", ""]
    text = "\n".join(lines)
    parse_ring(text, source="the generated ring.toml")
    return text


def _ports_per_host(hosts: Sequence[str], base: int, http_base: int | None) -> tuple[list[int], list[int]]:
    count = {h: hosts.count(h) for h in hosts}
    seen: dict[str, int] = {}
    ports, https = [], []
    for h in hosts:
        k = seen[h] = seen.get(h, -1) + 1
        ports.append(base + k)
        https.append((http_base if http_base is not None else base + count[h]) + k)
    top = max(ports + https)
    if base < 1 or (http_base is not None and http_base < 1) or top > 65535:
        raise ConfigError(f"ports must be in 1..65535: --base-port {base}"
                          f"{f' --http-base-port {http_base}' if http_base is not None else ''} would use up to {top}")
    return ports, https
