"""Stop strings over a stream of text deltas.

A stop string may span deltas, so text that could be the start of one is held back
until the next delta decides: the client never sees any part of a stop string.
"""

from __future__ import annotations


class StopMatcher:
    """Feed text deltas; get back the text safe to send and whether a stop string ended
    the stream. O(len(delta) * total stop length) per delta."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        text = self._held + delta
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of the stream (it turned out not to be a stop)."""
        held, self._held = self._held, ""
        return held
