from __future__ import annotations

import pytest

from ringllm.errors import ConfigError
from ringllm.ring.config import init_ring_toml, load_ring, parse_ring

GOOD = """
name = "t"
secret = "0123456789abcdef0123"
[[peer]]
host = "127.0.0.1"
port = 7001
[[peer]]
host = "127.0.0.1"
port = 7002
weight = 2
"""


def test_good_ring_parses():
    cfg = parse_ring(GOOD)
    assert cfg.size == 2 and cfg.weights == [1.0, 2.0] and cfg.wire == "f32"
    assert cfg.peers[1].http_port == 8002 and cfg.secret == b"0123456789abcdef0123"


@pytest.mark.parametrize("text,message", [
    ("name = 't'\nsecret='0123456789abcdef0123'\n", r"peer: is required"),
    (GOOD.replace("port = 7002", "port = 'abc'"), r"peer\[1\]\.port: must be an integer in 1..65535, got 'abc'"),
    (GOOD.replace("port = 7002", "port = 70000"), r"peer\[1\]\.port: must be an integer in 1..65535"),
    (GOOD.replace("port = 7002", "port = 7001"), r"peer\[1\]\.port: 127.0.0.1:7001 is already used by peer\[0\]"),
    (GOOD.replace("weight = 2", "weight = -1"), r"peer\[1\]\.weight: must be a positive number"),
    (GOOD.replace('name = "t"', 'name = "t"\nwire = "f16"'), r"wire: must be one of f32, q8_0, got 'f16'"),
    (GOOD.replace('secret = "0123456789abcdef0123"', 'secret = "short"'), r"secret: the secret must be at least 16"),
    (GOOD.replace('secret = "0123456789abcdef0123"', ''), r"secret: give exactly one of"),
    (GOOD.replace('secret = "0123456789abcdef0123"', 'secret_env = "RINGLLM_NO_SUCH_VAR"'), r"RINGLLM_NO_SUCH_VAR is not set"),
    (GOOD + "\nbogus = 1\n", r"peer\[1\]\.bogus: unknown key"),
    ("name = \n", r"not valid TOML"),
    (GOOD.replace("[[peer]]\nhost = \"127.0.0.1\"\nport = 7001", "[[peer]]\nport = 7001", 1), r"peer\[0\]\.host: is required"),
])
def test_bad_ring_names_the_field(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_ring(text)


def test_wrong_rank_is_named():
    with pytest.raises(ConfigError, match=r"rank 5 is out of range: the ring has 2 peers"):
        parse_ring(GOOD).peer(5)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_ring(tmp_path / "nope.toml")


def test_init_writes_a_ring_that_parses(tmp_path):
    p = tmp_path / "ring.toml"
    p.write_text(init_ring_toml(3))
    cfg = load_ring(p)
    assert cfg.size == 3 and len({x.port for x in cfg.peers} | {x.http_port for x in cfg.peers}) == 6
    assert len(cfg.secret) == 48
    assert parse_ring(init_ring_toml(3)).secret != cfg.secret


def test_peers_spin_only_when_their_host_has_a_core_for_each(monkeypatch):
    from ringllm import launch

    three_here = GOOD + '[[peer]]\nhost = "127.0.0.1"\nport = 7003\n'
    two_hosts = GOOD.replace('host = "127.0.0.1"\nport = 7002', 'host = "10.0.0.2"\nport = 7002')
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1})
    assert launch.may_spin(parse_ring(GOOD), 0)  # 2 peers, 2 cores
    assert not launch.may_spin(parse_ring(three_here), 1)  # 3 peers share 2 cores
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0})
    assert not launch.may_spin(parse_ring(GOOD), 0)
    assert launch.may_spin(parse_ring(two_hosts), 0) and launch.may_spin(parse_ring(two_hosts), 1)


def _two_hosts(http_host: str | None) -> str:
    """Rank 0 on this machine, rank 1 at a TEST-NET address no machine here has."""
    text = GOOD.replace('host = "127.0.0.1"\nport = 7002', 'host = "192.0.2.10"\nport = 7002')
    return text + (f'\n[http]\nhost = "{http_host}"\n' if http_host else "")


@pytest.mark.parametrize("http_host,expected", [
    (None, ["127.0.0.1:8001", "192.0.2.10:8002"]),  # default loopback: home peers there
    ("127.0.0.2", ["127.0.0.2:8001", "192.0.2.10:8002"]),  # the peers' own host, not the ring's
    ("0.0.0.0", ["127.0.0.1:8001", "192.0.2.10:8002"]),  # every interface: the ring host reaches it
    ("::1", ["[::1]:8001", "192.0.2.10:8002"]),
])
def test_http_address_is_the_http_host_on_this_machine_and_the_ring_host_elsewhere(http_host, expected):
    cfg = parse_ring(_two_hosts(http_host))
    assert [cfg.http_address(r) for r in range(cfg.size)] == expected
    with pytest.raises(ConfigError, match="rank 2 is out of range"):
        cfg.http_address(2)


def test_this_machine_is_what_a_socket_here_can_bind():
    import socket

    from ringllm.ring.config import is_loopback, is_this_machine

    assert is_loopback("127.0.0.5") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.10") and not is_loopback("vm")
    assert is_this_machine("127.0.0.5") and is_this_machine(socket.gethostname())
    assert not is_this_machine("192.0.2.10") and not is_this_machine("no-such-host.invalid")
