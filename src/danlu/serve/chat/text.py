"""Streaming text out of token ids: incremental detokenizing that never splits a multi-byte character,
and stop strings matched on the decoded text across token boundaries, held back and never leaked."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that do not yet form a character


class Detokenizer:
    """Text deltas for generated token ids, one id at a time.

    Each step decodes the ids from `prefix` (where the last emitted text started) twice: up to `read`
    (the ids already emitted) and to the end. The difference is the new text, emitted only when it does
    not end in U+FFFD: an incomplete UTF-8 sequence (a CJK character or emoji split over byte tokens) waits
    for the ids that complete it. Decoding from a shared prefix keeps tokenizers that drop a word's
    leading space at the start of a decode consistent, so the deltas concatenate to decode(all ids)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.emitted = ""  # decode(ids[prefix:read]): known from the last emit, not decoded again

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(self.emitted) and not after.endswith(REPLACEMENT):
            delta = after[len(self.emitted) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted = self._decode(self.ids[self.prefix : self.read])
            return delta
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete character stays as U+FFFD, as decode would show it)."""
        delta = self._decode(self.ids[self.prefix :])[len(self.emitted) :]
        self.prefix = self.read = len(self.ids)
        self.emitted = ""
        return delta


class StopStrings:
    """Holds back the last max(len(stop)) - 1 characters, which may be the start of a stop string; on a
    match, emits the text before it and reports the stop. The stop string itself is never emitted."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """(text that is safe to emit, whether a stop string was found)."""
        self.pending += delta
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        if len(self.pending) <= self.hold:
            return "", False
        cut = len(self.pending) - self.hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
