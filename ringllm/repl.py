"""The interactive chat with any peer of a running ring (``ringllm chat``, ``ringllm prompt --chat``).

At a terminal it is a REPL:

- line editing and history through :mod:`readline` where Python has it; the history is kept
  in ``chat_history`` in the ringllm cache directory (:func:`ringllm.paths.cache_dir`);
- Ctrl-C during a reply stops that reply only (leaving the request cancels it on the ring);
  the part already shown stays in the conversation. Ctrl-C at the prompt clears the line;
  Ctrl-D or ``/bye`` ends the chat (exit status 0);
- commands, never sent to the model: see :data:`HELP`;
- multi-line input: a line ending in a backslash continues on the next line; a line of three
  double quotes opens a block that the next such line closes;
- a lost peer (refused connection, ring broken mid-reply, 503) keeps the conversation: the
  chat says so, asks the peer's /health every :data:`RETRY_SECONDS` until its ring is up, then
  sends the message again. Ctrl-C stops waiting (the message is dropped; Up recalls it). A
  refused request (e.g. longer than the context) prints its error and drops the message.

With stdin not a terminal (a script piping lines), nothing is prompted and each line or block
is a user message; a lost peer or a refused request then ends the chat with the error
(raised), since nobody is there to wait. ``/reset`` works in both modes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from ringllm.errors import PeerLostError, RingError

if TYPE_CHECKING:
    import ssl

    from ringllm.generation import Completion

PROMPT, MORE = ">>> ", "... "
BLOCK = '"""'
# A restarted peer reloads its shard and re-forms its ring in seconds to a minute; asking its
# /health every 2 s notices it soon after without loading the peer (one small GET each time).
RETRY_SECONDS = 2.0
HISTORY_LINES = 1000

HELP = f"""\
Type a message and press Enter; the reply streams below. The whole conversation is sent each
turn, so the model sees the history.

  /help            this help (nothing is sent to the model)
  /reset           forget the conversation (the system message stays)
  /system TEXT     set the system message (/system alone removes it)
  /bye             end the chat (so does Ctrl-D on an empty line)

Multi-line messages: end a line with \\ to continue on the next, or type {BLOCK} on a line of
its own, then the lines, then {BLOCK} again. A one-line message that starts with / is a
command; start it with a space to send it as text.
Ctrl-C stops the reply being written (the conversation is kept); Up and Down recall earlier
lines. If the peer goes away, the chat waits for it and sends your message again."""


class _Bye(Exception):
    """/bye: leave the chat."""


class Chat:
    """One chat with the peer at ``address``; :meth:`run` reads and answers until the end.

    ``params`` are the generation fields sent with every turn (see
    :data:`ringllm.client.GENERATION_PARAMS`); ``json_out`` prints one JSON object per reply
    instead of streaming its text.
    """

    def __init__(self, address: str, *, api_key: str | None = None, ssl: ssl.SSLContext | None = None,
                 system: str | None = None, params: dict[str, Any] | None = None, json_out: bool = False,
                 interactive: bool | None = None, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.address, self.api_key, self.ssl = address, api_key, ssl
        self.system = system or None
        self.params = dict(params or {})
        self.json_out = json_out
        self.interactive = sys.stdin.isatty() if interactive is None else interactive
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.messages: list[dict[str, str]] = []  # the conversation, without the system message

    # -- the loop -------------------------------------------------------------------------
    def run(self, first: str | None = None) -> int:
        """Chat until /bye or end of input; returns the exit status (0)."""
        history = _open_history() if self.interactive else None
        if self.interactive:
            self.say("type /help for help, /bye to leave")
        pending = [first] if first and first.strip() else []
        try:
            with asyncio.Runner() as runner:
                while True:
                    try:
                        text, one_line = (pending.pop(0), True) if pending else self.read_message()
                        if one_line and text.startswith("/"):
                            self.command(text)
                        elif text.strip():
                            self.turn(runner, text)
                    except KeyboardInterrupt:  # at the prompt: a fresh line
                        self.out.write("\n")
                    except (EOFError, _Bye):
                        break
        finally:
            if history is not None:
                history()
        if self.interactive:
            self.out.write("\n")
        return 0

    def read_message(self) -> tuple[str, bool]:
        """One message: a line, a backslash-continued run of lines, or a triple-quote block;
        and whether it was a single line (only those can be commands). Raises EOFError at
        the end of input."""
        line = self._input(PROMPT)
        if line.strip() == BLOCK:
            lines = []
            while (line := self._input(MORE)).strip() != BLOCK:
                lines.append(line)
            return "\n".join(lines), False
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = self._input(MORE)
        return "\n".join(lines + [line]), not lines

    def _input(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)  # readline's line editing when it is loaded
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def command(self, text: str) -> None:
        name, _, arg = text.strip().partition(" ")
        if name == "/help":
            self.out.write(HELP + "\n")
        elif name == "/reset":
            self.messages = []
            self.say("history cleared")
        elif name == "/system":
            self.system = arg.strip() or None
            self.say(f"system message set: {self.system}" if self.system else "system message removed")
        elif name in ("/bye", "/exit", "/quit"):
            raise _Bye
        else:
            self.say(f"unknown command {name} (/help lists them; start a message with a space to send a /)")
        self.out.flush()

    # -- one turn -------------------------------------------------------------------------
    def turn(self, runner: asyncio.Runner, text: str) -> None:
        """Send ``text`` with the conversation and stream the reply; on success both join
        the conversation. See the module docstring for Ctrl-C and a lost peer."""
        self.messages.append({"role": "user", "content": text})
        while True:
            shown: list[str] = []
            try:
                done = runner.run(self._complete(shown))
            except KeyboardInterrupt:
                self._end_line(shown)
                self._keep_partial(shown, "reply stopped")
                return
            except PeerLostError as exc:
                self._end_line(shown)
                if not self.interactive:
                    raise
                if not self._wait_for_ring(runner, exc):
                    return
                continue
            except RingError as exc:
                self._end_line(shown)
                self.messages.pop()
                if not self.interactive:
                    raise
                self.say(f"error: {exc} (the message was not kept; Up recalls it)")
                return
            self.messages.append({"role": "assistant", "content": done.text})
            self._report(done)
            return

    async def _complete(self, shown: list[str]) -> Completion:
        from ringllm.client import connect

        def on_text(piece: str) -> None:
            shown.append(piece)
            if not self.json_out:
                self.out.write(piece)
                self.out.flush()

        system = [{"role": "system", "content": self.system}] if self.system else []
        async with connect(self.address, api_key=self.api_key, ssl=self.ssl) as client:
            return await client.complete(messages=system + self.messages, on_text=on_text, **self.params)

    def _wait_for_ring(self, runner: asyncio.Runner, exc: PeerLostError) -> bool:
        """Wait until the peer's ring is up again (True) or the user presses Ctrl-C (False)."""
        self.say(f"{exc}. The conversation is kept; waiting for the ring to come back, then your "
                 "message is sent again (Ctrl-C stops waiting)")
        try:
            runner.run(self._until_up())
        except KeyboardInterrupt:
            self.out.write("\n")
            self.messages.pop()
            self.say("stopped waiting; your message was not sent (Up recalls it)")
            return False
        self.say("the ring is back; sending your message again")
        return True

    async def _until_up(self) -> None:
        from ringllm.client import connect

        said = time.monotonic()
        while True:
            try:
                async with connect(self.address, api_key=self.api_key, ssl=self.ssl, timeout=5.0) as client:
                    health = await client.health()
                if health.get("status") == "ok":
                    return
                why = f"its state is {health.get('status')!r}"
            except (RingError, asyncio.TimeoutError, OSError, ValueError) as exc:
                why = str(exc) or type(exc).__name__
            if time.monotonic() - said > 30:  # a sign of life twice a minute, not a flood
                self.say(f"still waiting for {self.address} ({why})")
                said = time.monotonic()
            await asyncio.sleep(RETRY_SECONDS)

    # -- output ---------------------------------------------------------------------------
    def _end_line(self, shown: list[str]) -> None:
        if shown and not self.json_out:
            self.out.write("\n")
            self.out.flush()

    def _keep_partial(self, shown: list[str], what: str) -> None:
        partial = "".join(shown)
        if partial:
            self.messages.append({"role": "assistant", "content": partial})
            self.say(f"{what}; the part shown stays in the conversation")
        else:
            self.messages.pop()
            self.say(f"{what}; your message was not kept (Up recalls it)")

    def _report(self, done: Completion) -> None:
        if self.json_out:
            self.out.write(json.dumps(done.to_json(), ensure_ascii=False) + "\n")
        else:
            self.out.write("\n")
        self.out.flush()
        self.say(f"{len(done.ids)} tokens, first after {done.time_to_first_token * 1000:.0f} ms, "
                 f"{done.tokens_per_second:.1f} tokens/s, finish: {done.finish_reason}")

    def say(self, msg: str) -> None:
        print(f"ringllm: {msg}", file=self.err, flush=True)


def _open_history() -> Callable[[], None] | None:
    """Load readline's history from the cache directory; returns the function that saves it
    (None where Python has no readline, e.g. Windows: input() then still works, unedited)."""
    try:
        import readline
    except ImportError:
        return None
    from ringllm.paths import cache_dir

    path = cache_dir() / "chat_history"
    readline.set_history_length(HISTORY_LINES)
    try:
        readline.read_history_file(path)
    except (FileNotFoundError, OSError):
        pass

    def save() -> None:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as exc:
            print(f"ringllm: could not save the chat history to {path}: {exc}", file=sys.stderr)

    return save
