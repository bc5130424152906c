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
    """A generation request is invalid (e.g. the prompt is longer than the context).

    ``param`` names the request field at fault (``"stop"``, ``"messages[2].content"``) when
    one is; ``code`` is a machine-readable reason (``"context_length_exceeded"``) or None.
    The HTTP API reports both in its error bodies.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFullError(RequestError):
    """The ring's waiting line is full; try again later (HTTP 429)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="queue_full")


class ProtocolError(RingError):
    """Bytes on a peer link broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The remote side sent bytes the protocol forbids."""


class HandshakeError(RingError):
    """A peer was refused at the handshake (wrong secret, ring, model, plan or version)."""


class ConfigMismatchError(HandshakeError):
    """An authenticated peer's configuration differs from ours (ring size, rank, model, plan,
    ring.toml settings): permanent, so a peer that meets it while first joining exits with it
    rather than retry, whichever side of the connection noticed."""


class PeerLostError(RingError):
    """A ring neighbour stopped answering or closed its link.

    ``peer`` is the peer that was lost and ``reason`` why; the message is
    ``"lost peer <peer>: <reason>"``. When the loss was noticed elsewhere and relayed (a
    ``bye`` naming the lost peer), ``reporter`` is the peer that noticed it and ``cause`` its
    own reason, without the relay's wording (what it passes on in turn); otherwise
    ``reporter`` is None and ``cause`` is ``reason``.
    """

    PREFIX = "lost peer "

    def __init__(self, peer: str, reason: str, *, reporter: str | None = None, cause: str | None = None) -> None:
        super().__init__(f"{self.PREFIX}{peer}: {reason}")
        self.peer = peer
        self.reason = reason
        self.reporter = reporter
        self.cause = reason if cause is None else cause

    @classmethod
    def from_message(cls, message: str) -> "PeerLostError":
        """The error whose message is ``message`` (as a peer's HTTP API reports it): the
        inverse of ``str()``. A message of another form becomes the reason of a loss of
        ``"ring"``, keeping the text whole."""
        if message.startswith(cls.PREFIX) and ": " in message:
            peer, reason = message[len(cls.PREFIX):].split(": ", 1)
            return cls(peer, reason)
        return cls("ring", message)
