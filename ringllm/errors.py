"""The closed vocabulary of errors ringllm raises.

Every error a user or a remote peer can cause is a subclass of :class:`RingError`, and its
message names the thing that was wrong (the field, the file, the tensor, the rank or the peer).
"""

from __future__ import annotations


class RingError(Exception):
    """Base class of every error ringllm raises on purpose."""


class ConfigError(RingError):
    """A configuration file or command-line option is invalid."""


class ModelError(RingError):
    """A model file is missing, malformed, truncated or of an unsupported kind."""


class UnsupportedError(ModelError):
    """A model uses an architecture or tensor type ringllm does not implement."""


class FetchError(RingError):
    """A model could not be fetched, unpacked or verified."""


class RequestError(RingError):
    """A generation request is invalid (e.g. the prompt is longer than the context)."""


class ProtocolError(RingError):
    """Bytes on a peer link broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The remote side sent bytes the protocol forbids."""


class HandshakeError(RingError):
    """A peer was refused at the handshake (wrong secret, ring, model, plan or version)."""


class PeerLostError(RingError):
    """A ring neighbour stopped answering or closed its link."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"lost peer {peer}: {reason}")
        self.peer = peer
        self.reason = reason
