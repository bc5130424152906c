"""Issue 15, item 5: a peer's HTTP port against slow and greedy clients (ringllm.http.serve).

A real app (one in-process peer of the tiny model) served by :func:`serve_http` on a real
loopback port, with deadlines configured small; the clients are raw sockets that dribble a
request one byte at a time, stay silent, or hold connections. Bounds are checked with socket
timeouts far above the deadlines (a busy box only makes them slower, never wrong); "not before
the deadline" is checked too, since a deadline that fires early would cut real clients.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from ringllm.http.serve import LINGER, HttpLimits, serve_http
from ringllm.ring.config import parse_ring
from tests.ring_thread import RingThread

SLACK = 10.0  # how far past a deadline a close may come on a busy box before we call it missing


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    from tests.synth import write_tiny_model

    model = write_tiny_model(tmp_path_factory.mktemp("limits") / "tiny4k.gguf", context_length=4096)
    with RingThread(peers=1, model=str(model)) as r:
        yield r


@pytest.fixture
def serve(rt):
    """serve(limits, body_timeout) -> (HttpServer, app) on a free loopback port; closed afterwards."""
    from ringllm.http.app import make_app

    servers = []

    def start(limits: HttpLimits):
        app = make_app(rt.peers[0], body_timeout=limits.body_timeout)

        async def go():
            return await serve_http(app, "127.0.0.1", 0, limits=limits)

        srv = rt.call(go)
        servers.append(srv)
        return srv, app

    yield start
    for srv in servers:
        rt.call(srv.close)


def _connect(port: int, timeout: float) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(timeout)
    return s


def _dribble_until_closed(s: socket.socket, data: bytes, limit: float) -> tuple[bytes, int, float]:
    """Send ``data`` one byte every 50 ms (then keep sending spaces) until the server closes;
    return (what it answered, bytes sent, seconds). Fails if it is still open after ``limit`` s."""
    t0, got, sent = time.monotonic(), b"", 0
    s.settimeout(0.05)
    while time.monotonic() - t0 < limit:
        try:
            s.send(data[sent:sent + 1] if sent < len(data) else b" ")
            sent += 1
        except OSError:  # EPIPE / ECONNRESET: closed
            return got, sent, time.monotonic() - t0
        try:
            chunk = s.recv(65536)
            if not chunk:
                return got, sent, time.monotonic() - t0
            got += chunk
        except TimeoutError:
            pass
        except OSError:
            return got, sent, time.monotonic() - t0
    raise AssertionError(f"still open after {limit:g} s of dribbling ({sent} bytes sent, answered {got[:200]!r})")


def test_the_defaults_close_a_slowloris_within_30_s_and_ring_toml_sets_them():
    d = HttpLimits()
    assert d.header_timeout + d.body_timeout + LINGER <= 30
    assert 1 <= d.max_connections <= 1000
    peer = '[[peer]]\nhost = "127.0.0.1"\nport = 7000\n'
    cfg = parse_ring(f'name = "x"\nmodel = "m"\nsecret = "{"s" * 16}"\n{peer}')
    assert (cfg.http_header_timeout, cfg.http_body_timeout, cfg.http_max_connections) == (
        d.header_timeout, d.body_timeout, d.max_connections)
    cfg = parse_ring(f'name = "x"\nmodel = "m"\nsecret = "{"s" * 16}"\n[http]\nheader_timeout = 3\n'
                     f'body_timeout = 4.5\nmax_connections = 7\n{peer}')
    assert (cfg.http_header_timeout, cfg.http_body_timeout, cfg.http_max_connections) == (3.0, 4.5, 7)
    for bad, field in [("header_timeout = 0", "http.header_timeout"), ("body_timeout = -1", "http.body_timeout"),
                       ("body_timeout = nan", "http.body_timeout"), ("max_connections = 0", "http.max_connections"),
                       ('max_connections = "9"', "http.max_connections")]:
        with pytest.raises(Exception, match=field.replace(".", r"\.")):
            parse_ring(f'name = "x"\nmodel = "m"\nsecret = "{"s" * 16}"\n[http]\n{bad}\n{peer}')


def test_a_silent_connection_is_closed_at_the_header_deadline(serve):
    srv, _ = serve(HttpLimits(header_timeout=1.0, body_timeout=1.0, max_connections=8))
    s = _connect(srv.port, 1.0 + SLACK)
    t0 = time.monotonic()
    assert s.recv(1024) == b""  # closed, no answer (a timeout here raises)
    assert time.monotonic() - t0 >= 0.9
    s.close()


def test_headers_dribbled_a_byte_at_a_time_are_cut_off_at_the_header_deadline(serve):
    srv, _ = serve(HttpLimits(header_timeout=1.0, body_timeout=30.0, max_connections=8))
    s = _connect(srv.port, 1.0)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 20)
                                                                       for i in range(100))
    got, sent, took = _dribble_until_closed(s, head, 1.0 + SLACK)
    s.close()
    assert got == b"" and 10 < sent < len(head), (got, sent)  # never a complete head, never an answer
    assert took >= 0.9


def test_a_body_dribbled_a_byte_at_a_time_gets_a_408_and_is_closed(serve):
    srv, _ = serve(HttpLimits(header_timeout=30.0, body_timeout=1.0, max_connections=8))
    s = _connect(srv.port, 1.0)
    body = json.dumps({"prompt": "the", "max_tokens": 2, "pad": "z" * 1000}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body))
    got, sent, took = _dribble_until_closed(s, body, 1.0 + LINGER + SLACK)
    s.close()
    assert sent < len(body)
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), got[:300]
    err = json.loads(rest)["error"]
    assert err["type"] == "invalid_request_error" and "did not arrive within 1 s" in err["message"], err
    assert took >= 0.9


def test_connections_over_the_cap_get_a_503_and_the_admitted_ones_keep_working(serve):
    srv, _ = serve(HttpLimits(header_timeout=60.0, body_timeout=60.0, max_connections=3))
    held = [_connect(srv.port, 30.0) for _ in range(3)]
    deadline = time.monotonic() + 30
    while srv.open_connections < 3:
        assert time.monotonic() < deadline, srv.open_connections
        time.sleep(0.02)
    extra = _connect(srv.port, 30.0)
    extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while chunk := extra.recv(65536):  # then closed by the peer
        answer += chunk
    extra.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head, answer[:300]
    err = json.loads(body)["error"]
    assert err["code"] == "too_many_connections" and "3 HTTP connections" in err["message"], err
    assert srv.refused_connections == 1 and srv.open_connections == 3

    def health(s: socket.socket) -> bytes:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        return s.recv(65536)

    assert health(held[0]).startswith(b"HTTP/1.1 200 ")
    held.pop().close()
    while srv.open_connections > 2:
        assert time.monotonic() < deadline, srv.open_connections
        time.sleep(0.02)
    held.append(_connect(srv.port, 30.0))  # room again
    assert health(held[-1]).startswith(b"HTTP/1.1 200 ")
    assert srv.refused_connections == 1
    for s in held:
        s.close()


def test_a_long_stream_outlives_both_deadlines(serve):
    """The client reads slowly (small receive buffer), so the handler is still writing long after
    the header and body deadlines; the stream must end normally with every token."""
    from ringllm.http.plumbing import METRICS_KEY

    deadline = 0.2
    srv, app = serve(HttpLimits(header_timeout=deadline, body_timeout=deadline, max_connections=8))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.port))
    s.settimeout(60)
    n = 3000
    body = json.dumps({"prompt": "the", "max_tokens": n, "ignore_eos": True, "stream": True, "logprobs": 20,
                       "temperature": 0}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    # Read slowly, and note the last moment the handler was seen still streaming: it must be
    # well past both deadlines (the socket buffers may absorb the stream's tail, so the
    # handler can finish before the client has read it all: sample while reading).
    got, t0, streaming_at = b"", time.monotonic(), 0.0
    while time.monotonic() - t0 < 3.0 and b"[DONE]" not in got:
        chunk = s.recv(512)
        assert chunk, f"closed mid-stream after {time.monotonic() - t0:.1f} s: {got[-300:]!r}"
        got += chunk
        if app[METRICS_KEY].in_progress == 1:
            streaming_at = time.monotonic() - t0
        time.sleep(0.02)
    print(f"handler still streaming {streaming_at:.2f} s in")
    assert streaming_at > 6 * deadline, f"the handler ended {streaming_at:.2f} s in: the test proves nothing"
    while chunk := s.recv(65536):
        got += chunk
        if got.endswith(b"0\r\n\r\n"):  # the last chunk of the chunked body
            break
    s.close()
    assert got.startswith(b"HTTP/1.1 200 ")
    assert b"data: [DONE]" in got and b'"finish_reason":"length"' in got.replace(b" ", b""), got[-500:]
    assert got.count(b'"text_offset"') >= n  # every token's event arrived (each has logprobs)
