"""The sans-IO frame codec: round trips, precise refusals, and a fuzz invariant.

Invariant (as h11's fuzzers check): whatever bytes arrive, fed whole or in any split, the decoder
returns frames or raises RemoteProtocolError, never anything else, and never holds more than one
maximum frame.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringllm.errors import LocalProtocolError, RemoteProtocolError
from ringllm.ring.wire import (
    PREFIX,
    Frame,
    FrameDecoder,
    encode_frame,
    encode_frame_bytes,
    head_template,
)

MAX_FRAME = 4096
MAX_HEADER = 512


def raw_frame(header: bytes, payload: bytes = b"", *, magic: bytes = b"RL", version: int = 1,
              flags: int = 0, hlen: int | None = None, plen: int | None = None) -> bytes:
    """A frame built by hand, so tests can break any field."""
    hlen = len(header) if hlen is None else hlen
    plen = len(payload) if plen is None else plen
    return struct.pack(">2sBBII", magic, version, flags, hlen, plen) + header + payload


def feed_split(data: bytes, cuts: list[int], **kw: int) -> list[Frame]:
    dec = FrameDecoder(**kw)
    frames: list[Frame] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:]):
        frames += dec.feed(data[a:b])
    assert dec.buffered <= dec.max_frame
    return frames


# -- round trips ------------------------------------------------------------------------------
header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
kinds = st.text(min_size=1, max_size=16)
headers = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "k"), header_values, max_size=5)


@given(st.lists(st.tuples(kinds, headers, st.binary(max_size=300)), max_size=6),
       st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_round_trip_any_split(items, cuts, as_bytearray):
    # Kinds without a registered schema, so any header round-trips.
    items = [("x-" + kind, header, payload) for kind, header, payload in items]
    data = b"".join(encode_frame_bytes(k, h, p or None) for k, h, p in items)
    if as_bytearray:
        data = bytearray(data)  # the copying path
    frames = feed_split(bytes(data) if not as_bytearray else data, cuts)
    assert [(f.kind, f.header, bytes(f.payload)) for f in frames] == [
        (k, h, p) for k, h, p in items]


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.uint8, np.float16])
def test_numpy_payload_is_not_copied_by_encoder(dtype):
    arr = np.arange(100).astype(dtype).reshape(10, 10)
    head, view = encode_frame("x-arr", {"shape": [10, 10]}, arr)
    assert view is not None and view.nbytes == arr.nbytes and view.format == "B"
    assert np.shares_memory(np.frombuffer(view, np.uint8), arr)
    (frame,) = FrameDecoder().feed(head + bytes(view))
    assert np.array_equal(np.frombuffer(frame.payload, dtype).reshape(10, 10), arr)


def test_large_payload_of_whole_chunk_is_zero_copy_view():
    payload = bytes(range(256)) * 256  # 64 KiB
    data = encode_frame_bytes("x-big", {}, payload)
    (frame,) = FrameDecoder().feed(data)
    assert isinstance(frame.payload, memoryview) and frame.payload.readonly
    assert frame.payload.obj is data
    assert bytes(frame.payload) == payload


def test_empty_payload_and_schema_kinds():
    data = encode_frame_bytes("ping", {"t": 5}) + encode_frame_bytes("coll", {"s": 1, "i": 0, "o": "ar"}, b"")
    frames = FrameDecoder().feed(data)
    assert [(f.kind, f.header, f.payload) for f in frames] == [
        ("ping", {"t": 5}, b""), ("coll", {"s": 1, "i": 0, "o": "ar"}, b"")]


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 255, 65535, 2**32, 2**64 - 1])
def test_head_template_plus_sequence_decodes_as_the_same_frame(seq):
    # An independent reading: msgpack itself unpacks the header, and the decoder agrees.
    payload = bytes(range(16))
    head = head_template("coll", {"i": 1, "o": "ar", "n": 4}, len(payload)) + seq.to_bytes(8, "big")
    header = msgpack.unpackb(head[PREFIX:])
    assert header == {"k": "coll", "i": 1, "o": "ar", "n": 4, "s": seq}
    assert list(header)[-1] == "s"
    (frame,) = FrameDecoder().feed(head + payload)
    assert frame == Frame("coll", {"s": seq, "i": 1, "o": "ar", "n": 4}, payload)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=6), hint=st.integers(0, 5),
       pings=st.lists(st.booleans(), min_size=6, max_size=6), split=st.integers(0, 4000))
def test_expected_head_gives_the_frames_parsing_gives(seqs, hint, pings, split):
    """A decoder told one frame's head (FrameDecoder.expect) returns, for any stream of frames
    cut anywhere, exactly what a decoder without the hint returns, and uses the hint once."""
    template = head_template("coll", {"i": 0, "o": "ar", "n": 2}, 8)
    stream = b""
    for seq, ping in zip(seqs, pings):
        if ping:
            stream += encode_frame_bytes("ping", {"t": seq % 1000})
        stream += template + seq.to_bytes(8, "big") + seq.to_bytes(8, "little")
    plain, hinted = FrameDecoder(), FrameDecoder()
    s = seqs[min(hint, len(seqs) - 1)]
    given_header = {"i": 0, "o": "ar", "n": 2, "s": s}
    hinted.expect(template + s.to_bytes(8, "big"), "coll", given_header)
    cut = min(split, len(stream))
    want = plain.feed(stream[:cut]) + plain.feed(stream[cut:])
    got = hinted.feed(stream[:cut]) + hinted.feed(stream[cut:])
    assert got == want
    used = sum(f.header is given_header for f in got)
    assert used == 1 if cut in (0, len(stream)) else used <= 1  # whole frames in one chunk use it


def test_an_expected_head_is_not_taken_for_a_frame_that_only_begins_with_it():
    head = head_template("coll", {"i": 0, "o": "ar", "n": 2}, 8) + (5).to_bytes(8, "big")
    dec = FrameDecoder()
    dec.expect(head[:-3], "coll", {"bogus": True})  # a shorter head must match in full
    (frame,) = dec.feed(head + bytes(8))
    assert frame.header == {"i": 0, "o": "ar", "n": 2, "s": 5}


def test_head_template_refuses_a_header_too_big_for_a_fixmap():
    with pytest.raises(LocalProtocolError, match="at most 14 header fields"):
        head_template("x", {f"f{i}": i for i in range(15)}, 0)


# -- local errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,header,payload,match", [
    ("", {}, None, "kind"),
    ("x" * 65, {}, None, "kind"),
    ("x", {"k": "y"}, None, "reserved"),
    ("x", {"a": object()}, None, "cannot encode"),
    ("x", {"a": "y" * 600}, None, "header is"),
    ("x", {}, b"z" * MAX_FRAME, "frame is"),
    ("x", {}, np.zeros((4, 4), np.float32)[:, ::2], "C-contiguous"),
])
def test_encoder_refuses_bad_frames_locally(kind, header, payload, match):
    with pytest.raises(LocalProtocolError, match=match):
        encode_frame(kind, header, payload, max_frame=MAX_FRAME, max_header=MAX_HEADER)


# -- remote errors -------------------------------------------------------------------------------
GOOD_HEADER = msgpack.packb({"k": "x"})


@pytest.mark.parametrize("data,match", [
    (raw_frame(GOOD_HEADER, magic=b"GE"), "magic"),
    (raw_frame(GOOD_HEADER, version=2), "codec version 2 not supported"),
    (raw_frame(GOOD_HEADER, flags=1), "flags"),
    (raw_frame(b"", hlen=0), "header length 0"),
    (raw_frame(b"", hlen=MAX_HEADER + 1), "header length"),
    (raw_frame(GOOD_HEADER, plen=MAX_FRAME), "exceeds max"),
    (raw_frame(msgpack.packb([1, 2])), "not a map"),
    (raw_frame(msgpack.packb({"k": "x"}) + b"\x00"), "not valid msgpack"),  # trailing garbage
    (raw_frame(b"\xc1"), "not valid msgpack"),  # never-used msgpack byte
    (raw_frame(msgpack.packb({"k": "x"})[:-1]), "not valid msgpack"),  # truncated header
    (raw_frame(msgpack.packb({1: 2, "k": "x"})), "not valid msgpack|key"),
    (raw_frame(msgpack.packb({b"k": "x"}, use_bin_type=True)), "key"),
    (raw_frame(msgpack.packb({"a": 1})), "kind"),
    (raw_frame(msgpack.packb({"k": 3})), "kind"),
    (raw_frame(msgpack.packb({"k": ""})), "kind"),
    (raw_frame(msgpack.packb({"k": "coll", "s": "1", "i": 0, "o": "ar"})), "'s' has type str"),
    (raw_frame(msgpack.packb({"k": "coll", "s": True, "i": 0, "o": "ar"})), "'s' has type bool"),
    (raw_frame(msgpack.packb({"k": "coll", "i": 0, "o": "ar"})), "lacks required header field 's'"),
    (raw_frame(b"\xa2\xff\xfe"), "not valid msgpack"),  # invalid UTF-8 str
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_decoder_refuses_bad_input_precisely(data, match, bytewise):
    dec = FrameDecoder(max_frame=MAX_FRAME, max_header=MAX_HEADER)
    with pytest.raises(RemoteProtocolError, match=match):
        if bytewise:
            for i in range(len(data)):
                dec.feed(data[i:i + 1])
        else:
            dec.feed(data)
    # Broken for good: no frame boundary can be trusted after bad input.
    with pytest.raises(RemoteProtocolError):
        dec.feed(encode_frame_bytes("x", {}))


def test_frames_before_the_bad_one_are_not_lost_when_fed_separately():
    dec = FrameDecoder()
    assert len(dec.feed(encode_frame_bytes("x", {}))) == 1
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"XX" + b"\x00" * 20)


def test_decoder_allocates_payload_only_after_valid_prefix_and_header():
    dec = FrameDecoder(max_frame=MAX_FRAME)
    data = raw_frame(GOOD_HEADER, b"p" * 1000)
    dec.feed(data[:PREFIX])
    assert dec.buffered == 0 and dec.needed == len(GOOD_HEADER) + 1000
    dec.feed(data[PREFIX:PREFIX + len(GOOD_HEADER)])
    assert dec.buffered == PREFIX + len(GOOD_HEADER) + 1000 <= MAX_FRAME
    (frame,) = dec.feed(data[PREFIX + len(GOOD_HEADER):])
    assert bytes(frame.payload) == b"p" * 1000 and dec.buffered == 0


# -- fuzz -------------------------------------------------------------------------------------------
def _mutations() -> st.SearchStrategy[bytes]:
    """Mostly-valid streams with random corruption, plus pure noise."""
    valid = st.lists(st.tuples(st.sampled_from(["x", "coll", "ping", "hello", "refuse"]),
                               headers, st.binary(max_size=64)), max_size=4).map(
        lambda items: b"".join(encode_frame_bytes(k, h, p or None) for k, h, p in items))

    @st.composite
    def corrupt(draw):
        data = bytearray(draw(valid))
        for _ in range(draw(st.integers(0, 4))):
            if data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            data += draw(st.binary(max_size=40))
        return bytes(data)

    return st.one_of(st.binary(max_size=2000), corrupt())


@given(_mutations(), st.lists(st.integers(0, 5000), max_size=10))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_decoder_yields_frames_or_remote_protocol_error(data, cuts):
    whole_frames: list[Frame] | None
    try:
        whole_frames = FrameDecoder(max_frame=MAX_FRAME, max_header=MAX_HEADER).feed(data)
    except RemoteProtocolError:
        whole_frames = None
    dec = FrameDecoder(max_frame=MAX_FRAME, max_header=MAX_HEADER)
    split_frames: list[Frame] = []
    split_error = False
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:]):
        try:
            split_frames += dec.feed(data[a:b])
        except RemoteProtocolError:
            split_error = True
            break
        assert dec.buffered <= MAX_FRAME
    # Splitting never changes the outcome.
    if whole_frames is None:
        assert split_error
    else:
        assert not split_error and split_frames == whole_frames
        for frame in whole_frames:
            assert isinstance(frame.kind, str) and isinstance(frame.header, dict)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_fuzz_byte_by_byte_never_buffers_past_one_frame(data):
    dec = FrameDecoder(max_frame=256, max_header=64)
    try:
        for i in range(len(data)):
            dec.feed(data[i:i + 1])
            assert dec.buffered <= 256
    except RemoteProtocolError:
        pass
