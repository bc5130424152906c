"""Stop strings in streamed text (a request's ``stop``), found also across piece boundaries."""

from __future__ import annotations

from typing import Iterable

from ringllm.errors import RequestError


class StopMatcher:
    """Finds stop strings in streamed text, also when one spans several pieces.

    :meth:`push` returns ``(text, stopped)``. `text` is safe to emit: it never contains a stop
    string or a part of one. Any tail that could be the start of a stop string is held back
    until later text decides it. Once a stop string completes, `text` is everything before it
    (the one that completes first, reading character by character, so the result does not
    depend on how the text was cut), `stopped` is True, ``matched`` names it and the rest is
    dropped; later pushes return ``("", True)``. :meth:`flush` returns the held tail when the
    stream ends unstopped.
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self.stop_strings = tuple(dict.fromkeys(stop_strings))
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise RequestError(f"stop strings must be non-empty strings, got {list(self.stop_strings)!r}")
        self.stopped = False
        self.matched: str | None = None
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        # A stop string cannot start in text already emitted: that text was never a possible
        # start of one, so searching the held tail plus the new piece is enough.
        text = self._held + piece
        # Earliest end wins, then earliest start; a string's first occurrence is its earliest end.
        hits = [(at + len(s), at, s) for s in self.stop_strings if (at := text.find(s)) >= 0]
        if hits:
            _, at, self.matched = min(hits)
            self.stopped, self._held = True, ""
            return text[:at], True
        keep = self._partial_len(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
