"""Document -> tokens: the chat template's frame around a context, and around a question.

As kvpress's pipeline does, the user turn holds context + question: the context ids are the
template's opening (system turn, "<|im_start|>user\\n", ...) followed by the document, prefilled
and compressed once; each question is the question text plus the template's closing part (e.g.
"<|im_end|>\\n<|im_start|>assistant\\n"), appended after the compressed context.

Exact identity: the document never passes through the template. The frame is found once by
rendering the template around a marker, and the document is tokenized on its own with
``split_special_tokens``, so every character of it is kept, and text that looks like a template
marker ("<|im_end|>") stays text instead of closing the user's turn. ``document(ids)`` recovers
the text exactly from its context ids (tested with arbitrary Unicode).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

from transformers import PreTrainedTokenizerBase

_MARKER = "\ue000kvcompose-document\ue001"  # private-use characters: no template emits them


@dataclass(frozen=True)
class PromptFormat:
    """How a tokenizer's chat template wraps a context and a question."""

    tokenizer: PreTrainedTokenizerBase
    # transformers keeps "split special tokens" as tokenizer state set per call: encodes must not interleave
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @cached_property
    def _frame(self) -> tuple[list[int], str]:
        """(token ids before the document, template text after it)."""
        tok = self.tokenizer
        if tok.chat_template is None:
            head, suffix = tok.bos_token or "", "\n"
        else:
            text = tok.apply_chat_template([{"role": "user", "content": _MARKER}], add_generation_prompt=True,
                                           tokenize=False)
            if text.count(_MARKER) != 1:
                raise ValueError("the chat template does not place the user's message verbatim")
            head, suffix = text.split(_MARKER)
        return self._encode(head, split=False), suffix

    def _encode(self, text: str, split: bool) -> list[int]:
        """Template text (``split`` False: its markers are special tokens) or user text (True: plain text)."""
        with self._lock:
            return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split)

    def _text_ids(self, text: str) -> list[int]:
        return self._encode(text, split=True)

    def context_ids(self, context: str) -> list[int]:
        """Raises ValueError for text the tokenizer cannot represent exactly (two such documents could
        share ids, so they are refused rather than answered from each other's cache)."""
        head, _ = self._frame
        ids = self._text_ids(context)
        decoded = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        if decoded != context:
            raise ValueError(f"document: {self._unrepresentable(context, decoded)}; remove or replace it")
        return head + ids

    def _unrepresentable(self, text: str, decoded: str) -> str:
        offset = next((i for i, (a, b) in enumerate(zip(text, decoded)) if a != b), min(len(text), len(decoded)))
        if offset < len(text):
            return (f"character U+{ord(text[offset]):04X} at offset {offset} has no exact token in this model's "
                    "vocabulary")
        return "the model's tokenizer does not keep this text exactly"

    def document(self, context_ids: list[int]) -> str:
        """The document text of ``context_ids`` made by ``context_ids`` (exact inverse)."""
        head, _ = self._frame
        if context_ids[: len(head)] != head:
            raise ValueError("these ids do not start with the chat template's opening")
        return self.tokenizer.decode(context_ids[len(head):], clean_up_tokenization_spaces=False)

    def question_ids(self, question: str, answer_prefix: str = "") -> list[int]:
        _, suffix = self._frame
        return self._text_ids(question) + self._encode(suffix + answer_prefix, split=False)
