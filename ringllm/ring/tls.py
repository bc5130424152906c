"""TLS contexts from ring.toml's ``[tls]`` table (cert, key, ca).

Peer links use **mutual** TLS: both ends present their certificate and require the other's,
signed by the ring's ``ca``. Host names are not checked: a ring's CA signs only its own
peers, and which peer is which (rank, ring, model) is proved by the HMAC handshake that still
runs inside TLS. So TLS adds confidentiality and integrity for every frame after the
handshake, and a second factor (a certificate) for joining the ring.

The HTTP API uses the same certificate and key as a plain TLS server (clients are not asked
for certificates; use ``[http] api_key`` to authenticate them). See docs/security.md.
"""

from __future__ import annotations

import ssl

from ringllm.errors import ConfigError
from ringllm.ring.config import TlsConfig

__all__ = ["http_server_context", "peer_contexts"]


def _load(ctx: ssl.SSLContext, tls: TlsConfig) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"[tls] cert {tls.cert} / key {tls.key}: cannot load: {exc}") from None
    return ctx


def _trust(ctx: ssl.SSLContext, tls: TlsConfig) -> ssl.SSLContext:
    try:
        ctx.load_verify_locations(cafile=str(tls.ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"[tls] ca {tls.ca}: cannot load: {exc}") from None
    return ctx


def peer_contexts(tls: TlsConfig) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for the listening side, client context for the connecting side) of a
    peer link: both present ``cert`` and require a peer certificate signed by ``ca``.

    Raises ConfigError naming the file that cannot be loaded.
    """
    server = _trust(_load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls), tls)
    server.verify_mode = ssl.CERT_REQUIRED
    client = _trust(_load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls), tls)
    client.check_hostname = False  # identity is the handshake's job (see the module doc)
    client.verify_mode = ssl.CERT_REQUIRED
    return server, client


def http_server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The HTTP API's server context: presents ``cert``; asks clients for nothing."""
    return _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls)


def http_client_context(tls: TlsConfig) -> ssl.SSLContext:
    """A client context that trusts the ring's ``ca`` (for health checks and tests)."""
    ctx = _trust(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls)
    ctx.check_hostname = False
    return ctx
