"""Pure pieces of the collectives: which frame comes from where, and is it the one expected.

Nothing here does I/O.  :func:`exchange_plan` is the exchange algorithm (every vector passed
both ways round the ring) as a list of hops for one rank; :class:`Want` describes the next frame
a collective waits for, and :func:`check_frame` is the one check every received collective
frame passes; :func:`head_templates` are an all-reduce's frame heads, encoded once, and
:func:`expected_header` the header they decode to; :func:`segments` and :func:`chunks` cut a
vector for the ring algorithm.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from ringllm.errors import RemoteProtocolError
from ringllm.ring.wire import Frame, head_template

__all__ = ["NEXT", "PREV", "Hop", "Want", "check_frame", "chunks", "exchange_plan", "expected_header",
           "head_templates", "segments", "want"]

NEXT, PREV = 0, 1  # a peer's two links, as indices into (next, prev)


class Hop(NamedTuple):
    """One frame an exchange receives: on link ``side``, carrying rank ``origin``'s vector, as
    frame ``index`` of the call on that link; ``forward``: pass it on to the other link as frame
    ``index + 1``."""

    side: int
    origin: int
    index: int
    forward: bool


@functools.cache
def exchange_plan(rank: int, size: int) -> tuple[Hop, ...]:
    """The exchange, for ``rank`` of a ring of ``size`` >= 2, as the hops it receives in order.

    Every peer first sends its own vector to ``next`` and, when ``size > 2``, to ``prev``
    (both as frame 0).  A vector travels ``size // 2`` hops clockwise (arriving from ``prev``)
    and ``(size - 1) // 2`` counter-clockwise (from ``next``), each peer forwarding what it
    receives, so after ``ceil((size-1)/2)`` hops every peer holds all ``size`` vectors.  The two
    directions are interleaved, nearest first, to keep both moving.
    """
    cw, ccw = size // 2, (size - 1) // 2
    plan = []
    for hop in range(1, cw + 1):
        plan.append(Hop(PREV, (rank - hop) % size, hop - 1, hop < cw))
        if hop <= ccw:
            plan.append(Hop(NEXT, (rank + hop) % size, hop - 1, hop < ccw))
    return tuple(plan)


class Want(NamedTuple):
    """The next frame a collective waits for: a ``coll`` frame on link ``side`` with op ``op``
    and index ``i`` (of the call's sequence number), naming ``n`` elements and carrying
    ``nbytes`` of payload when those are given.  ``head`` is the frame's exact encoded prefix
    and header when known: a lent link can then compare bytes instead of decoding
    (``tcp.BlockingLink.recv_expected``), and the program is sent the payload alone (the
    frame holds nothing else it does not already know)."""

    side: int
    op: str
    i: int
    n: int | None = None
    nbytes: int | None = None
    head: bytes | None = None


def want(side: int, op: str, i: int, n: int | None = None, nbytes: int | None = None,
         head: bytes | None = None) -> Want:
    """``Want(...)`` at a fifth of the cost of the NamedTuple's generated ``__new__`` (0.2 vs
    0.9 us on the bench box): the lent all-reduce makes one per frame on its hot path."""
    return _new_tuple(Want, (side, op, i, n, nbytes, head))


_new_tuple = tuple.__new__


def check_frame(peer: str, frame: Frame, seq: int, want: Want) -> Frame:
    """``frame`` if it is the one ``want`` describes in call ``seq``, else the precise
    RemoteProtocolError naming ``peer``."""
    h = frame.header
    if frame.kind != "coll" or h["s"] != seq or h["o"] != want.op or h["i"] != want.i:
        got = (f"{frame.kind!r} frame" if frame.kind != "coll"
               else f"seq {h['s']} op {h['o']!r} frame {h['i']}")
        raise RemoteProtocolError(f"peer {peer} is out of step: got {got}, expected "
                                  f"seq {seq} op {want.op!r} frame {want.i}")
    if want.n is not None and h.get("n") != want.n:
        raise RemoteProtocolError(f"peer {peer} all-reduces {h.get('n')!r} elements but we have {want.n}")
    if want.nbytes is not None and len(frame.payload) != want.nbytes:
        raise RemoteProtocolError(f"peer {peer} sent {len(frame.payload)} payload bytes "
                                  f"(expected {want.nbytes})")
    return frame


@functools.lru_cache(maxsize=64)  # a handful of (op, n, size) in practice
def head_templates(op: str, n: int | None, nbytes: int, count: int) -> tuple[bytes, ...]:
    """The heads of frames ``i = 0 .. count-1`` of an all-reduce of ``n`` elements in
    ``nbytes``-byte payloads, as ``wire.head_template``s: ``templates[i] + seq.to_bytes(8,
    "big")`` is the head in call ``seq``, and its header is :func:`expected_header`'s."""
    return tuple(head_template("coll", {"i": i, "o": op, "n": n}, nbytes) for i in range(count))


def expected_header(want: Want, seq: int) -> dict[str, Any]:
    """The header (kind ``coll``) of the frame ``want`` describes in call ``seq`` when its head
    comes from :func:`head_templates`: what those bytes decode to."""
    return {"i": want.i, "o": want.op, "n": want.n, "s": seq}


def segments(n: int, parts: int, align: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``parts`` contiguous pieces with ``align``-aligned inner boundaries."""
    cuts = [min(n, (n * j // parts) // align * align) for j in range(parts)] + [n]
    return [(cuts[j], cuts[j + 1]) for j in range(parts)]


def chunks(a: int, b: int, size: int) -> list[tuple[int, int]]:
    """``range(a, b)`` in pieces of ``size`` (the last may be shorter)."""
    return [(s, min(b, s + size)) for s in range(a, b, size)]
