"""Document -> tokens: the chat template split into a context part and a question part.

As kvpress's pipeline does: the user turn holds context + question, so the template is applied to
the context followed by a unique separator, and split there. The context ids are prefilled and
compressed once; each question is the question text plus the template's closing part (e.g.
"<|im_end|>\\n<|im_start|>assistant\\n"), appended after the compressed context.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptFormat:
    """How a tokenizer's chat template wraps a context and a question."""

    tokenizer: PreTrainedTokenizerBase

    def _split(self, context: str) -> tuple[str, str]:
        tok = self.tokenizer
        if tok.chat_template is None:
            return (tok.bos_token or "") + context, "\n"
        separator = "#" * (len(context) + 10)
        text = tok.apply_chat_template(
            [{"role": "user", "content": context + separator}], add_generation_prompt=True, tokenize=False
        )
        head, suffix = text.split(separator)
        return head, suffix

    def context_ids(self, context: str) -> list[int]:
        head, _ = self._split(context)
        return self.tokenizer.encode(head, add_special_tokens=False)

    def question_ids(self, question: str, answer_prefix: str = "") -> list[int]:
        _, suffix = self._split("")
        return self.tokenizer.encode(question + suffix + answer_prefix, add_special_tokens=False)
