"""Sans-IO frame codec for peer links.

No sockets here: :func:`encode_frame` turns ``(kind, header, payload)`` into buffers to write,
and :class:`FrameDecoder` turns received bytes into :class:`Frame` objects.  The asyncio code in
``links.py`` only moves bytes.  The full byte layout and the decoder states are in
``docs/protocol.md``; in short, one frame is::

    offset  size  field
    0       2     magic b"RL"
    2       1     codec version (1)
    3       1     flags (0; every other value is refused)
    4       4     header length H, u32 big-endian, 1 <= H <= max_header
    8       4     payload length N, u32 big-endian, 12 + H + N <= max_frame
    12      H     header: a msgpack map with str keys; "k" (str, the frame kind) is required
    12+H    N     payload: raw bytes (e.g. a float32 or Q8_0 buffer), opaque to the codec

New frame kinds need no change here: a kind is a string and the header a free map.  A kind may
register required header fields in :data:`SCHEMAS` (or a decoder's ``schemas``) and the decoder
checks their types, so a consumer can trust them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from ringllm.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CODEC_VERSION",
    "as_bytes_view",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_HEADER",
    "MAGIC",
    "PREFIX",
    "SCHEMAS",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "encode_frame_bytes",
]

MAGIC = b"RL"
CODEC_VERSION = 1
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
DEFAULT_MAX_HEADER = 64 * 1024
MAX_KIND_LEN = 64

_PREFIX = struct.Struct(">2sBBII")  # magic, version, flags, header length, payload length
PREFIX = _PREFIX.size  # 12
_COPY_MAX = 16 * 1024

# Required header fields per kind: {kind: {field: type or tuple of types}}.  bool is a subclass
# of int, so an int field given True is refused explicitly by the check below.
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    # handshake (handshake.py)
    "hello": {"magic": bytes, "v": int, "nonce": bytes},
    "auth": {"mac": bytes},
    "config": {"ring": str, "rank": int, "size": int, "model": str, "plan": str, "cfg": str,
               "mac": bytes},
    "ready": {},
    "refuse": {"reason": str},
    # liveness (links.py)
    "ping": {"t": int},
    "pong": {"t": int},
    # collectives (collectives.py): sequence number, frame index within the call, op code
    "coll": {"s": int, "i": int, "o": str},
    # orderly goodbye, e.g. at shutdown (links.py)
    "bye": {"reason": str},
}

_pack = msgpack.Packer(use_bin_type=True).pack
_pack_prefix = _PREFIX.pack
unpackb = msgpack.unpackb


class Frame:
    """One decoded frame: ``kind``, the ``header`` map (without ``"k"``) and the ``payload``.

    ``payload`` is a read-only bytes-like object (``bytes`` or a ``memoryview`` of ``bytes``);
    wrap it with ``np.frombuffer`` without copying.  Empty payloads are ``b""``.
    """

    __slots__ = ("kind", "header", "payload")

    def __init__(self, kind: str, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        self.kind = kind
        self.header = header
        self.payload = payload

    def __repr__(self) -> str:
        return f"Frame({self.kind!r}, {self.header!r}, <{len(self.payload)} bytes>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.kind, self.header, bytes(self.payload)) == (
            other.kind, other.header, bytes(other.payload))


def as_bytes_view(payload: Any) -> memoryview:
    """A flat unsigned-byte view of ``payload`` (bytes, bytearray, memoryview or ndarray).

    The cast matters: ``len()`` of a float32 memoryview counts elements, and transports slice
    by ``len`` after a partial send.
    """
    try:
        view = memoryview(payload)
    except TypeError as exc:
        raise LocalProtocolError(f"frame payload is not a buffer: {exc}") from exc
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            raise LocalProtocolError("frame payload must be C-contiguous")
        if view.nbytes == 0:
            return memoryview(b"")  # cast() refuses shapes with zeros
        view = view.cast("B")
    return view


def encode_frame(
    kind: str,
    header: Mapping[str, Any] | None = None,
    payload: Any = None,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    max_header: int = DEFAULT_MAX_HEADER,
) -> tuple[bytes, memoryview | None]:
    """Encode one frame as ``(head, payload_view)``: prefix+header bytes and the payload.

    Write ``head`` then ``payload_view`` (``None`` when the payload is absent or empty); the
    payload is not copied, so the caller must not mutate it until the bytes are handed to the
    transport.

    Raises :class:`LocalProtocolError` if the kind or header is invalid or the frame would exceed
    ``max_frame`` / ``max_header``: sending it would make the peer drop the link.
    """
    if type(kind) is not str or not 0 < len(kind) <= MAX_KIND_LEN:
        raise LocalProtocolError(f"frame kind must be a str of 1..{MAX_KIND_LEN} chars, got {kind!r}")
    fields = {"k": kind}
    if header:
        fields.update(header)
        if fields["k"] is not kind:
            raise LocalProtocolError("header field 'k' is reserved for the frame kind")
    try:
        packed = _pack(fields)
    except Exception as exc:  # msgpack raises TypeError/ValueError/OverflowError
        raise LocalProtocolError(f"cannot encode header of {kind!r} frame: {exc}") from exc
    hlen = len(packed)
    if payload is None:
        view, n = None, 0
    else:
        view = as_bytes_view(payload)
        n = view.nbytes
    if hlen > max_header:
        raise LocalProtocolError(f"{kind!r} header is {hlen} bytes > max {max_header}")
    if PREFIX + hlen + n > max_frame:
        raise LocalProtocolError(f"{kind!r} frame is {PREFIX + hlen + n} bytes > max {max_frame}")
    return _pack_prefix(MAGIC, CODEC_VERSION, 0, hlen, n) + packed, (view if n else None)


def head_template(kind: str, header: Mapping[str, Any], nbytes: int) -> bytes:
    """The head (prefix and header) of a frame with an ``nbytes`` payload whose header is
    ``header`` plus a sequence number ``"s"``, all but the number's last 8 bytes:
    ``template + seq.to_bytes(8, "big")`` is the head of call ``seq``.  For hot paths that
    send the same frame family every call (the lent all-reduce: the head is built once, not
    msgpack-encoded per call); unchecked, so only for kinds and headers known good and sizes
    far below any frame limit.  The header stays a plain msgpack map (``"s"`` comes last, a
    fixed-width uint64), so any decoder reads it."""
    packed = _pack({"k": kind, **header})
    if not 0x80 <= packed[0] < 0x8F:  # a fixmap with room for "s"
        raise LocalProtocolError(f"head_template takes at most 14 header fields, not {len(header)}")
    packed = bytes((packed[0] + 1,)) + packed[1:] + b"\xa1s\xcf"
    return _pack_prefix(MAGIC, CODEC_VERSION, 0, len(packed) + 8, nbytes) + packed


def encode_frame_bytes(kind: str, header: Mapping[str, Any] | None = None, payload: Any = None,
                       **limits: int) -> bytes:
    """Like :func:`encode_frame` but returns one ``bytes`` object (copies the payload)."""
    head, view = encode_frame(kind, header, payload, **limits)
    return head if view is None else head + view


def _check_schema(kind: str, header: dict[str, Any],
                  schema: Mapping[str, type | tuple[type, ...]]) -> None:
    for field, types in schema.items():
        value = header.get(field, _MISSING)
        # Exact type match: msgpack yields exactly int/str/bytes/..., and bool is not an int here.
        if type(value) is not types and (type(types) is not tuple or type(value) not in types):
            if value is _MISSING:
                raise RemoteProtocolError(f"{kind!r} frame lacks required header field {field!r}")
            raise RemoteProtocolError(
                f"{kind!r} frame header field {field!r} has type {type(value).__name__}")


_MISSING = object()


# Decoder states (see docs/protocol.md): waiting for the 12-byte prefix, for H header bytes, for
# N payload bytes.  After the payload the decoder goes back to PREFIX.  A RemoteProtocolError
# moves it to BROKEN for good: after bad input the byte stream has no trustworthy frame boundary.
PREFIX_STATE, HEADER_STATE, PAYLOAD_STATE, BROKEN_STATE = "PREFIX", "HEADER", "PAYLOAD", "BROKEN"


class FrameDecoder:
    """Incremental, pure frame decoder: ``feed(bytes) -> list[Frame]``.

    Contract:
      * returns every frame completed by the bytes fed so far, in order; keeps the rest;
      * raises only :class:`RemoteProtocolError` on bad input (then every later ``feed`` raises
        it again: the stream is unusable);
      * holds at most one incomplete frame, so ``buffered`` never exceeds ``max_frame`` bytes;
        a frame's payload buffer is allocated only once its prefix has been validated;
      * large payloads (> 16 KiB) of frames that arrive whole inside one ``bytes`` chunk are
        zero-copy ``memoryview`` slices of that chunk; other payloads are copied once.
    """

    __slots__ = ("max_frame", "max_header", "schemas", "state", "_buf", "_need", "_hlen",
                 "_plen", "_header", "_kind", "_payload", "_pfill", "_error", "_expect")

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME,
                 max_header: int = DEFAULT_MAX_HEADER,
                 schemas: Mapping[str, Mapping[str, type | tuple[type, ...]]] | None = None) -> None:
        if max_frame < PREFIX + 1 or max_header < 1:
            raise ValueError("max_frame/max_header too small")
        self.max_frame = max_frame
        self.max_header = min(max_header, max_frame - PREFIX)
        self.schemas = SCHEMAS if schemas is None else schemas
        self.state = PREFIX_STATE
        self._buf = bytearray()  # partial prefix or partial header
        self._hlen = 0
        self._plen = 0
        self._kind = ""
        self._header: dict[str, Any] = {}
        self._payload: bytearray | None = None  # partial payload, preallocated to _plen
        self._pfill = 0
        self._error: RemoteProtocolError | None = None
        self._expect: tuple[bytes, str, dict[str, Any]] | None = None  # see expect()

    @property
    def buffered(self) -> int:
        """Bytes held for the incomplete frame (allocated payload space counts in full)."""
        n = len(self._buf)
        if self._payload is not None:
            n += PREFIX + self._hlen + len(self._payload)
        return n

    @property
    def needed(self) -> int:
        """Bytes still missing before the current frame is complete (> 0 unless broken).

        Lets a stream reader ask for exactly one frame (``readexactly(needed)``) so that it never
        consumes bytes that belong to whoever reads the stream next.
        """
        if self.state is PREFIX_STATE:
            return PREFIX - len(self._buf)
        if self.state is HEADER_STATE:
            return self._hlen - len(self._buf) + self._plen
        if self.state is PAYLOAD_STATE:
            return self._plen - self._pfill
        return 0

    @property
    def at_frame_start(self) -> bool:
        """True between frames: no byte of a next frame has been fed yet (and not broken)."""
        return self.state is PREFIX_STATE and not self._buf

    def expect(self, head: bytes, kind: str, header: dict[str, Any]) -> None:
        """Say that a frame whose prefix and header are the bytes ``head`` has ``kind`` and
        ``header`` (the caller built ``head`` from them, e.g. with :func:`head_template`):
        when the next such frame arrives whole, its header is taken from here, not parsed and
        checked again.  Only for a head the caller encoded itself: identical bytes decode to
        the same header, so the frames returned are the same with or without the hint.  One
        frame uses the hint (the dict becomes its header); a later ``expect`` replaces it."""
        self._expect = (head, kind, header)

    def payload_buffer(self) -> memoryview | None:
        """The unfilled tail of the payload being received, or None outside a payload.

        Lets the I/O layer receive payload bytes straight into place (``recv_into`` /
        ``BufferedProtocol``) instead of through ``feed``; report them with
        :meth:`payload_received`.  Valid until the next ``feed``/``payload_received`` call.
        """
        if self.state is not PAYLOAD_STATE:
            return None
        assert self._payload is not None
        return memoryview(self._payload)[self._pfill:]

    def payload_received(self, n: int) -> list[Frame]:
        """Account for ``n`` bytes written into :meth:`payload_buffer`; return the frame if it
        is now complete (a one-element list) or ``[]``."""
        if self.state is not PAYLOAD_STATE or not 0 < n <= self._plen - self._pfill:
            raise ValueError(f"payload_received({n}) outside a payload of {self._plen - self._pfill} "
                             "missing bytes")
        self._pfill += n
        if self._pfill < self._plen:
            return []
        payload = self._payload
        assert payload is not None
        self._payload = None
        return [self._finish(payload)]

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data``; return the frames it completes.  See the class contract."""
        if self._error is not None:
            raise self._error
        try:
            if type(data) is bytes and self.state is PREFIX_STATE and not self._buf:
                # Fast path (the common case on a socket): whole frames at the chunk's start.
                frames, pos = self._feed_whole(data)
                if pos == len(data):
                    return frames
                return frames + self._feed(memoryview(data)[pos:])
            return self._feed(data)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        except Exception as exc:  # defensive: the contract allows no other exception type
            err = RemoteProtocolError(f"undecodable frame: {exc!r}")
            self._fail(err)
            raise err from exc

    def _feed_whole(self, data: bytes) -> tuple[list[Frame], int]:
        """Parse the complete frames at the start of ``data``; large payloads are views."""
        frames: list[Frame] = []
        unpack_from, parse_header = _PREFIX.unpack_from, self._parse_header
        max_header, max_frame = self.max_header, self.max_frame
        pos, end = 0, len(data)
        mv = None
        while end - pos >= PREFIX:
            magic, version, flags, hlen, plen = unpack_from(data, pos)
            if (magic != MAGIC or version != CODEC_VERSION or flags or not 1 <= hlen <= max_header
                    or PREFIX + hlen + plen > max_frame):
                break  # let the general path report the precise error
            a = pos + PREFIX
            b = a + hlen
            c = b + plen
            if c > end:
                break
            expected = self._expect
            if expected is not None and data.startswith(expected[0], pos) and b - pos == len(expected[0]):
                self._expect = None
                self._kind, self._header = expected[1], expected[2]
            else:
                parse_header(data[a:b])
            if plen > _COPY_MAX:
                if mv is None:
                    mv = memoryview(data)
                payload: bytes | memoryview = mv[b:c]
            else:
                payload = data[b:c]  # copying a few KiB is cheaper than making a view
            frames.append(Frame(self._kind, self._header, payload))
            pos = c
        self._header = {}
        return frames, pos

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self.state = BROKEN_STATE
        self._buf = bytearray()
        self._payload = None

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        frames: list[Frame] = []
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        pos, end = 0, len(mv)
        while pos < end:
            state = self.state
            if state is PREFIX_STATE:
                take = min(PREFIX - len(self._buf), end - pos)
                self._buf += mv[pos:pos + take]
                pos += take
                if len(self._buf) == PREFIX:
                    self._parse_prefix(memoryview(bytes(self._buf)))
                    self._buf = bytearray()
                    self.state = HEADER_STATE
            elif state is HEADER_STATE:
                take = min(self._hlen - len(self._buf), end - pos)
                self._buf += mv[pos:pos + take]
                pos += take
                if len(self._buf) == self._hlen:
                    self._parse_header(memoryview(bytes(self._buf)))
                    self._buf = bytearray()
                    if self._plen == 0:
                        frames.append(self._finish(b""))
                    else:
                        self._payload = bytearray(self._plen)
                        self._pfill = 0
                        self.state = PAYLOAD_STATE
            else:  # PAYLOAD_STATE
                payload = self._payload
                assert payload is not None
                take = min(self._plen - self._pfill, end - pos)
                payload[self._pfill:self._pfill + take] = mv[pos:pos + take]
                self._pfill += take
                pos += take
                if self._pfill == self._plen:
                    self._payload = None
                    frames.append(self._finish(payload))
        return frames

    def _finish(self, payload: bytes | bytearray) -> Frame:
        frame = Frame(self._kind, self._header,
                      memoryview(payload).toreadonly() if payload else b"")
        self._header = {}
        self.state = PREFIX_STATE
        return frame

    def _parse_prefix(self, prefix: memoryview) -> None:
        magic, version, flags, hlen, plen = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r})")
        if version != CODEC_VERSION:
            raise RemoteProtocolError(
                f"frame codec version {version} not supported (we speak {CODEC_VERSION})")
        if flags:
            raise RemoteProtocolError(f"reserved frame flags set: {flags:#04x}")
        if not 1 <= hlen <= self.max_header:
            raise RemoteProtocolError(f"header length {hlen} outside 1..{self.max_header}")
        if PREFIX + hlen + plen > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {PREFIX + hlen + plen} bytes exceeds max {self.max_frame}")
        self._hlen, self._plen = hlen, plen

    def _parse_header(self, raw: bytes | memoryview) -> None:
        try:
            # msgpack >= 1.0 defaults: str keys/values decoded as UTF-8 (invalid UTF-8 raises),
            # map keys restricted to str/bytes, ext types decoded as inert ExtType values.
            header = unpackb(raw)
        except Exception as exc:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ...
            raise RemoteProtocolError(f"frame header is not valid msgpack: {exc}") from exc
        if not isinstance(header, dict):
            raise RemoteProtocolError(f"frame header is a {type(header).__name__}, not a map")
        for key in header:
            if type(key) is not str:
                raise RemoteProtocolError(f"frame header key {key!r} is not a str")
        kind = header.pop("k", None)
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_LEN:
            raise RemoteProtocolError(f"frame kind must be a str of 1..{MAX_KIND_LEN} chars, got {kind!r}")
        schema = self.schemas.get(kind)
        if schema:
            _check_schema(kind, header, schema)
        self._kind, self._header = kind, header
