"""A request's output text, built token by token, and its stop strings.

`tokenizers`' `DecodeStream` turns each new token into the text it completes (it waits for the
rest of a split UTF-8 character). The text is cut exactly before the first stop string; text that
could still be the start of a stop string is held back from the stream until the next tokens
settle it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens the decoder is primed with, so the first output token decodes as it would mid-text.
_PRIME_TOKENS = 8


class OutputText:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str],
                 skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(ids=list(prompt_ids[-_PRIME_TOKENS:]), skip_special_tokens=skip_special_tokens)
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self._sent = 0

    def add(self, token_id: int, *, check_stop: bool) -> str | None:
        """Append a token's text; the stop string it completed (the text is then cut before it), if any."""
        piece = self._decoder.step(self._tokenizer, token_id)
        if not piece:
            return None
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        if not check_stop or not self._stop:
            return None
        found = [(i, s) for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if not found:
            return None
        index, stop = min(found)
        self.text = self.text[:index]
        return stop

    def take(self, *, final: bool) -> str:
        """The text not yet sent that can be sent now (all of it once the request is finished)."""
        end = len(self.text) if final else max(self._sent, len(self.text) - self._held_back())
        piece = self.text[self._sent: end]
        self._sent = end
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the text that a stop string starts with."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
