"""Who may start a handshake on a peer's ring port, and how dropped connections are logged.

Pure bookkeeping (no sockets), used by :class:`ringllm.ring.formation.RingListener`:

* :class:`Admission` bounds handshakes in progress: at most ``per_source`` from one source
  address, at most ``strangers`` in all from addresses that are not a configured peer's host,
  and ``reserved`` more that only configured peer hosts may use.  So a flood from anywhere
  else (one address or many) fills at most the strangers' pool and can never take the slots a
  restarted neighbour needs; a flood from a configured host itself is bounded by
  ``per_source`` and the reserved pool, but not told apart from the real peer there (use a
  firewall, or ``[tls]``: see docs/security.md).
* :class:`DropLog` rate-limits the "dropped connection" log lines: a few lines per reason
  one by one, then one now and then, and a summary line per window counting the connections
  not logged one by one, by reason.  A flood of 200 connections reopened as
  they close made one line per connection before (9,750 lines in 31 s).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable

__all__ = ["Admission", "DropLog"]

# One source gets a few handshakes at once: a real peer needs one (two while a reconnect
# overlaps a dying attempt); a few more cover several peers behind one NAT address.
PER_SOURCE = 4
# Strangers (not a configured peer's host) share this many slots; they cannot use the others.
STRANGERS = 16
# Slots only configured peer hosts may use, beyond their share of the strangers' pool.
RESERVED = 8


class Admission:
    """Counts handshakes in progress by source host; :meth:`enter` says whether one may start."""

    def __init__(self, peer_hosts: Iterable[str] = (), *, per_source: int = PER_SOURCE,
                 strangers: int = STRANGERS, reserved: int = RESERVED) -> None:
        self.peer_hosts = frozenset(peer_hosts)
        self.per_source, self.strangers, self.reserved = per_source, strangers, reserved
        self._by_host: Counter[str] = Counter()
        self._strangers = 0  # in progress from non-peer hosts
        self._peers = 0  # in progress from peer hosts

    @property
    def pending(self) -> int:
        return self._strangers + self._peers

    def enter(self, host: str) -> str | None:
        """Take a slot for a connection from ``host``; the reason it may not, or None.

        Every successful ``enter`` must be matched by one :meth:`leave` with the same host.
        """
        if self._by_host[host] >= self.per_source:
            return f"{self._by_host[host]} handshakes already in progress from {host}"
        if host in self.peer_hosts:
            # A configured host may use the reserved pool and whatever strangers leave free.
            if self._peers >= self.reserved + max(0, self.strangers - self._strangers):
                return f"{self.pending} handshakes already in progress"
            self._peers += 1
        else:
            if self._strangers >= self.strangers:
                return f"{self._strangers} handshakes already in progress from hosts that are not peers"
            self._strangers += 1
        self._by_host[host] += 1
        return None

    def leave(self, host: str) -> None:
        self._by_host[host] -= 1
        if self._by_host[host] <= 0:
            del self._by_host[host]
        if host in self.peer_hosts:
            self._peers -= 1
        else:
            self._strangers -= 1


def reason_kind(reason: str) -> str:
    """A reason with its addresses, ports and numbers blanked: what the summary counts by."""
    return re.sub(r"\d[\w.:\[\]]*", "#", reason)[:80]


class DropLog:
    """Logs dropped connections one by one while they are few; counts the rest.

    Two token buckets: each reason (its :func:`reason_kind`) may log ``per_reason`` lines at
    once and then one per ``every`` seconds; all reasons together ``burst`` lines at once and
    then one per ``every / 2.5`` seconds.  Lines that do not fit are summed up by reason in one
    line per ``every`` seconds.  So at most burst + 60 / (every / 2.5) + 60 / every lines a
    minute (82 with the defaults; 24 a minute in a steady flood), however many reasons an
    attacker varies.  ``emit(line)`` writes a line; ``now`` is the clock (both replaceable for
    tests).  Call :meth:`tick` now and then (e.g. from a timer) to write a summary that is due.
    """

    def __init__(self, emit: Callable[[str], None], *, burst: int = 40, per_reason: int = 5,
                 every: float = 5.0, now: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.burst, self.per_reason, self.every, self.now = emit, burst, per_reason, every, now
        self._tokens = float(burst)
        self._kinds: dict[str, tuple[float, float]] = {}  # kind: (tokens, at)
        self._last = now()
        self._window_start = self._last
        self._held: Counter[str] = Counter()

    def drop(self, line: str, reason: str) -> None:
        """One dropped connection: ``line`` is its whole log line, ``reason`` why."""
        t = self.now()
        self._tokens = min(self.burst, self._tokens + (t - self._last) * 2.5 / self.every)
        self._last = t
        kind = reason_kind(reason)
        tokens, at = self._kinds.get(kind, (float(self.per_reason), t))
        tokens = min(self.per_reason, tokens + (t - at) / self.every)
        self.tick()
        if tokens >= 1 and self._tokens >= 1:
            self._tokens -= 1
            tokens -= 1
            self.emit(line)
        else:
            if not self._held:
                self._window_start = t
            self._held[kind] += 1
        if len(self._kinds) > 1000:  # forget refilled reasons (an attacker can vary them)
            self._kinds = {k: v for k, v in self._kinds.items() if v[0] + (t - v[1]) / self.every < self.per_reason}
        self._kinds[kind] = (tokens, t)

    def tick(self) -> None:
        """Write the summary of held lines if their window is over."""
        if self._held and self.now() - self._window_start >= self.every:
            total = sum(self._held.values())
            parts = "; ".join(f"{n} x {kind}" for kind, n in self._held.most_common(5))
            more = f"; {len(self._held) - 5} other reasons" if len(self._held) > 5 else ""
            self.emit(f"{total} more connections in the last {self.now() - self._window_start:.0f} s "
                      f"(not logged one by one): {parts}{more}")
            self._held.clear()


def log_emitter(log: logging.Logger, rank: int) -> Callable[[str], None]:
    """``emit`` for :class:`DropLog`: a WARNING ``rank R dropped <line>``."""
    return lambda line: log.warning("rank %d dropped %s", rank, line)
