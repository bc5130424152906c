"""`ringllm chat` at a terminal, driven through a pseudo-terminal (pexpect) against a real
SmolLM2 peer: line editing and history, Ctrl-C stops the reply only, commands that never
reach the model, multi-line input, and a lost peer that the chat waits for.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.request

import pexpect
import pytest

from tests.peer_procs import ROOT, Ring, ring_toml

pytestmark = pytest.mark.model
PROMPT = ">>> "
UP = "\x1b[A"


@pytest.fixture(scope="module")
def peer(tmp_path_factory, smollm2_path):
    tmp = tmp_path_factory.mktemp("repl")
    with Ring(tmp, ring_toml(1, str(smollm2_path)), tag="repl") as ring:
        ring.start_all()
        ring.wait_up()
        yield ring


def metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def chat(address: str, cache, *args: str) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RINGLLM_CACHE": str(cache), "TERM": "xterm", "INPUTRC": "/dev/null"}
    child = pexpect.spawn(sys.executable, ["-m", "ringllm", "chat", "--peer", address, "--temperature", "0", *args],
                          env=env, cwd=str(ROOT), encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect_exact("type /help for help")
    child.expect_exact(PROMPT)
    return child


def bye(child: pexpect.spawn) -> str:
    """/bye: the chat ends with status 0; returns everything it printed since the last expect."""
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in child.before
    return child.before


def test_help_and_the_other_commands_never_reach_the_model(peer, tmp_path):
    address = peer.http(0)
    before = metric(address, "ringllm_ring_requests_total")
    child = chat(address, tmp_path)
    child.sendline("/help")
    child.expect_exact("/system TEXT")
    child.expect_exact("Multi-line messages")
    child.expect_exact(PROMPT)
    child.sendline("/system Answer in one word.")
    child.expect_exact("system message set: Answer in one word.")
    child.expect_exact(PROMPT)
    child.sendline("/reset")
    child.expect_exact("history cleared")
    child.expect_exact(PROMPT)
    child.sendline("/frobnicate")
    child.expect_exact("unknown command /frobnicate")
    child.expect_exact(PROMPT)
    bye(child)
    assert metric(address, "ringllm_ring_requests_total") == before


def test_up_arrow_recalls_the_last_line_also_in_the_next_session(peer, tmp_path):
    child = chat(peer.http(0), tmp_path)
    child.sendline("/system Be brief.")
    child.expect_exact("system message set: Be brief.")
    child.expect_exact(PROMPT)
    child.send(UP)
    child.send("\r")
    child.expect_exact("system message set: Be brief.")  # the recalled line ran again
    child.expect_exact(PROMPT)
    bye(child)
    assert "/system Be brief." in (tmp_path / "chat_history").read_text()

    child = chat(peer.http(0), tmp_path)
    child.send(UP)  # /bye, the last line of the previous session
    child.send(UP)
    child.send("\r")
    child.expect_exact("system message set: Be brief.")
    child.expect_exact(PROMPT)
    bye(child)


def _stop_reply_midway(child: pexpect.spawn, peer: Ring, finished: float) -> None:
    """Ctrl-C once the reply has begun; returns when the peer has cancelled and freed it."""
    child.expect(r"\w")  # the reply has begun
    child.sendintr()
    child.expect_exact("reply stopped; the part shown stays in the conversation")
    child.expect_exact(PROMPT)
    deadline = time.monotonic() + 60
    while not ((h := peer.health(0)) and h["running"] == 0 and h["queue"] == 0
               and metric(peer.http(0), "ringllm_requests_finished_total") > finished):
        assert time.monotonic() < deadline, f"the peer still runs the stopped reply: {h}"
        time.sleep(0.1)
    text = urllib.request.urlopen(f"http://{peer.http(0)}/metrics", timeout=10).read().decode()
    assert re.search(r'ringllm_requests_finished_total\{[^}]*outcome="cancelled"[^}]*\} ', text), text


def test_ctrl_c_stops_the_reply_only_and_the_conversation_is_kept(peer, tmp_path):
    address = peer.http(0)
    child = chat(address, tmp_path, "--max-tokens", "1500")
    finished = metric(address, "ringllm_requests_finished_total")
    prompt_tokens = metric(address, "ringllm_prompt_tokens_total")
    child.sendline("Write a very long story about a dragon who learns to count.")
    child.expect_exact("learns to count.\r\n")  # the terminal's echo of the line
    _stop_reply_midway(child, peer, finished)
    first_prompt = metric(address, "ringllm_prompt_tokens_total") - prompt_tokens

    # The chat goes on, and the next message goes out with the question and the stopped reply.
    child.sendline("Go on.")
    child.expect_exact("Go on.\r\n")
    _stop_reply_midway(child, peer, finished + 1)
    second_prompt = metric(address, "ringllm_prompt_tokens_total") - prompt_tokens - first_prompt
    assert second_prompt > first_prompt + 3, (first_prompt, second_prompt)
    bye(child)


def test_multi_line_input_is_one_message(peer, tmp_path):
    address = peer.http(0)
    child = chat(address, tmp_path, "--max-tokens", "1", "--json")
    requests = metric(address, "ringllm_ring_requests_total")
    child.sendline("first line \\")
    child.expect_exact("... ")
    child.sendline("second line")
    child.expect(r'"prompt_ids"')
    child.expect_exact(PROMPT)
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("/not a command inside a block")
    child.expect_exact("... ")
    child.sendline("")
    child.expect_exact("... ")
    child.sendline('"""')
    child.expect(r'"prompt_ids"')
    child.expect_exact(PROMPT)
    bye(child)
    assert metric(address, "ringllm_ring_requests_total") == requests + 2


def test_a_lost_peer_keeps_the_conversation_and_the_chat_resends_when_it_is_back(tmp_path, smollm2_path):
    with Ring(tmp_path, ring_toml(1, str(smollm2_path)), tag="lost") as ring:
        ring.start_all()
        ring.wait_up()
        address = ring.http(0)
        child = chat(address, tmp_path, "--max-tokens", "8")
        child.sendline("Name a fruit.")
        child.expect(r"ringllm: (\d+) tokens, first after \d+ ms")
        first_reply = int(child.match.group(1))
        child.expect_exact(PROMPT)
        first_prompt = metric(address, "ringllm_prompt_tokens_total")
        ring.kill(0)
        child.sendline("Name a vegetable.")
        child.expect_exact("The conversation is kept; waiting for the ring to come back")
        ring.start(0)
        ring.wait_up()
        child.expect_exact("the ring is back; sending your message again", timeout=60)
        child.expect(r"tokens, first after \d+ ms")
        child.expect_exact(PROMPT)
        second_prompt = metric(address, "ringllm_prompt_tokens_total")  # the restarted peer's only request
        bye(child)
    # The resent request carried the first exchange: its prompt holds the first turn's prompt
    # (the second question alone is as long, give or take a token), the first reply and more.
    assert first_reply >= 4 and second_prompt > first_prompt + first_reply, (first_prompt, first_reply, second_prompt)
