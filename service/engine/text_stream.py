"""Generated token ids -> text pieces, for streaming: a piece is sent once it can no longer change.

Text is held back while it may be the start of a stop string or an incomplete character; a stop
string ends the answer (not included, unless ``keep_stop``: then its text up to trailing whitespace
is, as a model's default sentence end keeps its period). Without a tokenizer only the token ids are kept (benchmarks
and tests on random models).
"""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    """What a stream needs of a tokenizer (a transformers ``PreTrainedTokenizerBase`` is one)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, stop_strings: tuple[str, ...] = (), keep_stop: bool = False):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.keep_stop = keep_stop
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string appeared: take no more tokens

    def add(self, token: int) -> str:
        """The new piece of text this token makes final ("" if none)."""
        self.tokens.append(token)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        found = [(text.find(s), s) for s in self.stop_strings if s in text]
        if found:
            cut, stop = min(found)
            self.stopped = True
            return self._send(text[: cut + len(stop.rstrip())] if self.keep_stop else text[:cut])
        safe = len(text) - max((len(s) - 1 for s in self.stop_strings), default=0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._send(text[:safe])

    def finish(self) -> str:
        """What is left once no more tokens come."""
        if self.stopped or self.tokenizer is None:
            return ""
        return self._send(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _send(self, upto: str) -> str:
        if len(upto) <= len(self.sent):
            return ""
        piece, self.sent = upto[len(self.sent):], upto
        return piece
