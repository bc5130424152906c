"""The collectives' pure parts: the exchange's hop plan and the frame check."""

from __future__ import annotations

import pytest

from ringllm.errors import RemoteProtocolError
from ringllm.ring.schedule import (NEXT, PREV, Want, check_frame, exchange_plan, expected_header, head_templates,
                                   segments, want)
from ringllm.ring.wire import Frame, FrameDecoder


@pytest.mark.parametrize("p", range(2, 9))
def test_exchange_plan_delivers_every_vector_once_and_links_agree(p):
    """Run the plans of all ranks as a message system: what rank r sends on a link (its own
    vector as frame 0, then what its plan forwards) must be, frame for frame, what the rank at
    the other end expects there, and every rank must receive every other rank's vector once,
    within ceil((p-1)/2) hops."""
    sent = {(r, side): [r] if side == NEXT or p > 2 else [] for r in range(p) for side in (NEXT, PREV)}
    for r in range(p):
        for hop in exchange_plan(r, p):
            if hop.forward:
                out = sent[(r, PREV if hop.side == NEXT else NEXT)]
                assert len(out) == hop.index + 1, "forwarded out of order"
                out.append(hop.origin)
    for r in range(p):
        plan = exchange_plan(r, p)
        assert sorted(h.origin for h in plan) == sorted(set(range(p)) - {r})
        assert max(h.index for h in plan) + 1 == -(-(p - 1) // 2)
        # frames arriving on prev were sent by r-1 on its next link, and vice versa
        from_prev = [h.origin for h in sorted((h for h in plan if h.side == PREV), key=lambda h: h.index)]
        from_next = [h.origin for h in sorted((h for h in plan if h.side == NEXT), key=lambda h: h.index)]
        assert from_prev == sent[((r - 1) % p, NEXT)]
        assert from_next == sent[((r + 1) % p, PREV)]


def test_check_frame_names_what_is_wrong():
    ok = Frame("coll", {"s": 3, "i": 1, "o": "ar", "n": 4}, b"x" * 16)
    assert check_frame("rank 1", ok, 3, want(PREV, "ar", 1, 4, 16)) is ok
    assert want(NEXT, "bc", 2) == Want(NEXT, "bc", 2)
    cases = [
        (Frame("ping", {"t": 1}), "peer rank 1 is out of step: got 'ping' frame, expected seq 3 op 'ar' frame 1"),
        (Frame("coll", {"s": 2, "i": 1, "o": "ar", "n": 4}, b"x" * 16), "got seq 2 op 'ar' frame 1"),
        (Frame("coll", {"s": 3, "i": 0, "o": "ar", "n": 4}, b"x" * 16), "got seq 3 op 'ar' frame 0"),
        (Frame("coll", {"s": 3, "i": 1, "o": "ag", "n": 4}, b"x" * 16), "got seq 3 op 'ag' frame 1"),
        (Frame("coll", {"s": 3, "i": 1, "o": "ar", "n": 5}, b"x" * 16), "all-reduces 5 elements but we have 4"),
        (Frame("coll", {"s": 3, "i": 1, "o": "ar"}, b"x" * 16), "all-reduces None elements but we have 4"),
        (Frame("coll", {"s": 3, "i": 1, "o": "ar", "n": 4}, b"x" * 15), "sent 15 payload bytes \\(expected 16\\)"),
    ]
    for frame, match in cases:
        with pytest.raises(RemoteProtocolError, match=match):
            check_frame("rank 1", frame, 3, want(PREV, "ar", 1, 4, 16))


@pytest.mark.parametrize("n,parts", [(0, 3), (31, 2), (100, 3), (1000, 4), (64, 8)])
def test_segments_cover_the_range_on_block_boundaries(n, parts):
    segs = segments(n, parts, 32)
    assert len(segs) == parts and segs[0][0] == 0 and segs[-1][1] == n
    assert all(a <= b for a, b in segs) and all(segs[j][1] == segs[j + 1][0] for j in range(parts - 1))
    assert all(b % 32 == 0 for _, b in segs[:-1])


@pytest.mark.parametrize("seq", [1, 200, 70000, 2**40])
def test_head_templates_decode_to_the_expected_header_and_pass_the_check(seq):
    """What a program puts in a Want (a head from head_templates) is, parsed by the decoder,
    a frame with expected_header's header that check_frame accepts for that Want."""
    payload = bytes(24)
    for i, template in enumerate(head_templates("ar", 6, len(payload), 3)):
        w = want(PREV, "ar", i, 6, len(payload), template + seq.to_bytes(8, "big"))
        (frame,) = FrameDecoder().feed(w.head + payload)
        assert frame.kind == "coll" and frame.header == expected_header(w, seq)
        assert check_frame("peer rank 1", frame, seq, w) is frame
