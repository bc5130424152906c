"""Issue 15: a peer refused for a configuration mismatch is told why and exits, whichever side
of the connection noticed; a neighbour that is not up yet is only waited for."""

from __future__ import annotations

import asyncio
import time

from ringllm.ring.config import free_ports
from tests.peer_procs import Ring, ring_toml
from tests.test_security import _greedy


def test_a_rank_started_with_a_4_peer_ring_toml_against_a_3_peer_ring_exits_naming_it(tmp_path, tiny_model_path):
    ports = free_ports(8)
    kw = dict(name="size", heartbeat=0.3, dead_after=1.0, secret="refusal-test-secret")
    with Ring(tmp_path, ring_toml(3, str(tiny_model_path), ports=ports[:6], **kw), tag="size") as ring:
        ring.start_all()
        ring.wait_up(timeout=90)
        ring.kill(2)
        # Ranks 0..2 where they are, plus a rank 3 that does not exist: the newcomer's successor
        # (rank 3) is never up, which alone would only be waited for; its predecessor (rank 1)
        # connects to it and is authenticated, and the newcomer's listener finds the mismatch.
        big = tmp_path / "four.toml"
        big.write_text(ring_toml(4, str(tiny_model_path), ports=ports, **kw))
        mark = len(ring.log(2))
        proc = ring.start(2, ring_path=big)
        assert proc.wait(60) == 2, ring.log(2)[mark:][-2000:]
        errors = [line for line in ring.log(2)[mark:].splitlines() if line.startswith("ringllm: error:")]
        assert len(errors) == 1, ring.log(2)[mark:][-2000:]
        assert "peer rank 1 has ring size 3 but we have 4" in errors[0], errors
        print(f"\n{errors[0]}")
        # The survivor logged it too, and waits for a right one.
        ring.wait_log(1, r"ring size 4 but we have 3")
        assert ring.alive(0) and ring.alive(1)
        ring.start(2)
        ring.wait_up(timeout=60)
        assert asyncio.run(_greedy(ring.http(2)))


def test_a_neighbour_that_is_not_up_yet_is_waited_for(tmp_path, tiny_model_path):
    with Ring(tmp_path, ring_toml(3, str(tiny_model_path), name="late", heartbeat=0.3, dead_after=1.0),
              tag="late") as ring:
        ring.start(0)
        ring.start(1)
        ring.wait_log(1, r"joining ring", timeout=60)
        time.sleep(3)  # several connection attempts to rank 2 fail meanwhile
        assert ring.alive(0) and ring.alive(1)  # transient: still retrying
        ring.start(2)
        ring.wait_up(timeout=90)
