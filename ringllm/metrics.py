"""Request metrics of one peer's HTTP API, and the Prometheus text exposition of them.

The exposition format (version 0.0.4) is small enough to write by hand, which keeps the peer
free of another dependency and of a process-global registry: every :class:`Metrics` is owned
by one app, so several peers in one process (:class:`ringllm.LocalRing`) keep their numbers
apart. Format reference: one ``# HELP`` and one ``# TYPE`` line per family, then
``name{label="value"} number`` samples; histograms expose cumulative ``_bucket{le=...}``
samples plus ``_sum`` and ``_count``.

The peer's own counters (steps, sync and compute seconds, memory) are read from the peer at
scrape time (:func:`render`), so nothing here runs on the step loop.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

log = logging.getLogger("ringllm.requests")

# Seconds. TTFT on weak machines spans ~50 ms (short prompt, idle ring) to minutes (queued).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds per output token


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` is inclusive)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str, labels: dict[str, str]) -> list[str]:
        out, acc = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            acc += n
            out.append(f"{name}_bucket{_labels({**labels, 'le': _num(bound)})} {acc}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


@dataclass
class RequestRecord:
    """What one finished HTTP generation request did (logged and counted by :meth:`Metrics.finish`)."""

    id: str
    endpoint: str  # "chat", "completions" or "native"
    status: int = 200
    outcome: str = "ok"  # ok | cancelled (client went away) | error (failed after the first token)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter() when the first token was chosen
    ended: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        self.completion_tokens += 1

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    @property
    def tokens_per_second(self) -> float:
        """Decode rate after the first token (the prompt's prefill is in the TTFT)."""
        if self.first_token is None or self.completion_tokens < 2:
            return 0.0
        decode = (self.ended or time.perf_counter()) - self.first_token
        return (self.completion_tokens - 1) / decode if decode > 0 else 0.0


class Metrics:
    """Counters and histograms of one peer's HTTP API (single event loop: no locks needed)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status code) -> count
        self.outcomes: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_progress = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.duration = Histogram(LATENCY_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def start(self, rid: str, endpoint: str) -> RequestRecord:
        self.in_progress += 1
        return RequestRecord(rid, endpoint)

    def refused(self, endpoint: str, status: int) -> None:
        """A request answered with an error status before it ran (never started)."""
        key = (endpoint, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1

    def finish(self, rec: RequestRecord) -> None:
        """Count ``rec`` and log its one line; call exactly once per :meth:`start`."""
        rec.ended = time.perf_counter()
        self.in_progress -= 1
        self.refused(rec.endpoint, rec.status)
        if rec.status >= 400:
            return
        self.outcomes[rec.outcome] = self.outcomes.get(rec.outcome, 0) + 1
        self.prompt_tokens += rec.prompt_tokens
        self.completion_tokens += rec.completion_tokens
        self.duration.observe(rec.seconds)
        if rec.ttft is not None:
            self.ttft.observe(rec.ttft)
        if rec.completion_tokens > 1 and rec.tokens_per_second > 0:
            self.tpot.observe(1.0 / rec.tokens_per_second)
        ttft = f"{rec.ttft:.3f}s" if rec.ttft is not None else "-"
        log.info("request %s %s: %s, prompt_tokens=%d completion_tokens=%d ttft=%s tokens/s=%.1f total=%.3fs "
                 "finish=%s", rec.id, rec.endpoint, rec.outcome, rec.prompt_tokens, rec.completion_tokens, ttft,
                 rec.tokens_per_second, rec.seconds, rec.finish_reason)


def rss_bytes() -> int | None:
    """This process's resident set size, from /proc/self/statm (None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def kv_cache_bytes(peer: Any) -> int:
    """Bytes held by the KV caches of the peer's running sequences."""
    if hasattr(type(peer), "kv_cache_bytes"):  # a public counter, if the peer has one
        return int(peer.kv_cache_bytes)
    return sum(r.seq.cache.nbytes for r in list(getattr(peer, "_running", ())))


def wire_bytes(peer: Any) -> dict[str, int]:
    """Bytes the peer's ring links moved, by direction, as far as they are counted.

    The peer counts frame bytes sent (over every ring it has been part of); received bytes
    are counted only if the links offer ``bytes_received``.
    """
    out = {}
    sent = getattr(peer.stats, "bytes_sent", None)
    if isinstance(sent, int):
        out["sent"] = sent
    links = getattr(getattr(peer, "links", None), "links", None) or []
    recv = [getattr(lk, "bytes_received", None) for lk in links]
    if links and all(isinstance(x, int) for x in recv):
        out["received"] = sum(recv)
    return out


def render(metrics: Metrics, peer: Any) -> str:
    """The Prometheus text exposition of ``metrics`` and of ``peer``'s counters."""
    rank = str(peer.rank)
    base = {"rank": rank}
    fams: list[tuple[str, str, str, list[str]]] = []

    def add(name: str, kind: str, help_: str, samples: list[str]) -> None:
        fams.append((name, kind, help_, samples))

    def one(name: str, kind: str, help_: str, value: float, labels: dict[str, str] = base) -> None:
        add(name, kind, help_, [f"{name}{_labels(labels)} {_num(value)}"])

    add("ringllm_http_requests_total", "counter", "HTTP generation requests by endpoint and status code.",
        [f"ringllm_http_requests_total{_labels({**base, 'endpoint': e, 'code': c})} {n}"
         for (e, c), n in sorted(metrics.requests.items())])
    add("ringllm_requests_finished_total", "counter",
        "Generation requests that ran, by outcome (ok, cancelled: the client went away, error).",
        [f"ringllm_requests_finished_total{_labels({**base, 'outcome': o})} {n}" for o, n in sorted(metrics.outcomes.items())])
    one("ringllm_requests_in_progress", "gauge", "HTTP generation requests being served by this peer.", metrics.in_progress)
    one("ringllm_prompt_tokens_total", "counter", "Prompt tokens of requests served by this peer.", metrics.prompt_tokens)
    one("ringllm_completion_tokens_total", "counter", "Tokens generated for requests served by this peer.",
        metrics.completion_tokens)
    add("ringllm_time_to_first_token_seconds", "histogram", "Time from request to first token.",
        metrics.ttft.samples("ringllm_time_to_first_token_seconds", base))
    add("ringllm_request_duration_seconds", "histogram", "Time from request to last token.",
        metrics.duration.samples("ringllm_request_duration_seconds", base))
    add("ringllm_time_per_output_token_seconds", "histogram", "Mean time between tokens after the first, per request.",
        metrics.tpot.samples("ringllm_time_per_output_token_seconds", base))

    st = peer.stats
    one("ringllm_ring_steps_total", "counter", "Ring steps (one batched forward each) this peer took part in.", st.steps)
    one("ringllm_ring_tokens_total", "counter", "Tokens chosen by the ring for all sequences (any origin).", st.tokens)
    one("ringllm_ring_requests_total", "counter", "Requests submitted to the ring at this peer.", st.requests)
    one("ringllm_sync_seconds_total", "counter", "Seconds the step loop spent waiting in ring collectives.",
        st.sync_seconds)
    one("ringllm_compute_seconds_total", "counter", "Seconds the step loop spent computing (step time minus sync).",
        st.compute_seconds)
    one("ringllm_running_sequences", "gauge", "Sequences in the ring's running batch.", peer.running)
    one("ringllm_queue_depth", "gauge", "Requests waiting for a batch slot.", peer.queue_depth)
    one("ringllm_batch_limit", "gauge", "Most sequences in one step (max_batch).", peer.max_batch)
    one("ringllm_kv_cache_bytes", "gauge", "Bytes of KV cache held by this peer's shard of the running sequences.",
        kv_cache_bytes(peer))
    one("ringllm_weights_bytes", "gauge", "Bytes of model weights held by this peer.", peer.model.w.nbytes)
    if (rss := rss_bytes()) is not None:
        one("ringllm_resident_memory_bytes", "gauge", "Resident memory of this peer's process.", rss)
    if wb := wire_bytes(peer):
        add("ringllm_ring_bytes_total", "counter", "Frame bytes on this peer's ring links, by direction.",
            [f"ringllm_ring_bytes_total{_labels({**base, 'direction': d})} {n}" for d, n in wb.items()])
    up = peer.failure is None
    one("ringllm_ring_up", "gauge", "1 while this peer's ring runs, 0 after it broke.", int(up))
    one("ringllm_ring_peers", "gauge", "Peers in the ring.", peer.size)
    # A running ring needs every member, so "up" means all P; after a break only this peer is known alive.
    one("ringllm_ring_peers_up", "gauge", "Peers this peer knows to be up (all while the ring runs, itself after a break).",
        peer.size if up else 1)

    lines = []
    for name, kind, help_, samples in fams:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _num(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    return repr(float(x))
