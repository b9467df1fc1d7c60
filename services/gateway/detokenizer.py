"""Incremental detokenization and stop strings: token ids in, final text out, piece by piece.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas that never change
afterwards (the vLLM / TGI prefix-offset / read-offset scheme):

      tokens:  ... p p p p p | r r r | n
                   ^prefix_offset  ^read_offset
      prefix_text = decode(tokens[prefix_offset:read_offset])   # already emitted
      new_text    = decode(tokens[prefix_offset:])

  The new piece is `new_text[len(prefix_text):]`, emitted only when it is non-empty and does
  not end in U+FFFD: a byte-level token may carry half of a multi-byte UTF-8 character, and
  the character is emitted whole once the token completing it arrives. Decoding a few tokens
  of context before the new ones (the prefix) keeps tokenizers that drop a leading space on
  the first token (SentencePiece) right. `flush()` at the end emits what is still held back,
  so the concatenation of every piece equals `tokenizer.decode(output_ids)`.

`StopStrings` cuts the text at the first stop string, including one that spans several
deltas: it holds back the longest tail of the text that could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded as context before the first output token (vLLM uses 5 too)."""

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """The text of one completion, released as soon as it is final."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Only the tail of the prompt matters as decoding context.
        self._tokens: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def add(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the text that became final (possibly "")."""
        pieces = []
        for token_id in token_ids:
            self._tokens.append(token_id)
            pieces.append(self._step())
        return "".join(pieces)

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes to U+FFFD)."""
        prefix_text, new_text = self._texts()
        self._advance()
        return new_text[len(prefix_text) :]

    def _step(self) -> str:
        prefix_text, new_text = self._texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""  # a skipped special token, or an incomplete UTF-8 character
        self._advance()
        return new_text[len(prefix_text) :]

    def _texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        window = self._tokens[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        prefix_text = decode(window[:read], skip_special_tokens=self._skip_special)
        return prefix_text, decode(window, skip_special_tokens=self._skip_special)

    def _advance(self) -> None:
        """Everything up to here is emitted: the unread tokens become the next prefix."""
        del self._tokens[: self._prefix_offset]  # keep the window, not the whole output
        self._prefix_offset = self._read_offset - self._prefix_offset
        self._read_offset = len(self._tokens)


class StopStrings:
    """Cuts a completion's text before the first stop string (or after it, if included)."""

    def __init__(self, stop: Sequence[str] = (), include_in_output: bool = False):
        self.stop = tuple(s for s in stop if s)
        self.include_in_output = include_in_output
        self.matched: str | None = None
        """The stop string that ended the text, once one did."""
        self._held = ""

    def push(self, text: str) -> str:
        """Add text; return the part that is safe to emit. After a match, returns ""."""
        if self.matched is not None:
            return ""
        if not self.stop:
            return text
        buffer = self._held + text
        hit = self._first_match(buffer)
        if hit is not None:
            pos, stop = hit
            self.matched, self._held = stop, ""
            return buffer[: pos + len(stop)] if self.include_in_output else buffer[:pos]
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held-back tail, at the end of the completion."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            pos = buffer.find(stop)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest
