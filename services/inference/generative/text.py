"""A request's output text, built token by token, and its stop strings.

`tokenizers`' `DecodeStream` turns each new token into the text it completes (it waits for the
rest of a split UTF-8 character); when the request ends on such an unfinished character, `flush`
decodes the rest as a full decode would. The text is cut exactly before the first stop string;
text that could still be the start of a stop string is held back from the stream until the next
tokens settle it.
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
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids[-_PRIME_TOKENS:])  # tokens fed, after a little prompt context
        self._settled = len(self._ids)  # tokens whose text is in self.text
        self._decoder = DecodeStream(ids=list(self._ids), skip_special_tokens=skip_special_tokens)
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self._sent = 0

    def add(self, token_id: int, *, check_stop: bool) -> str | None:
        """Append a token's text; the stop string it completed (the text is then cut before it), if any."""
        piece = self._decoder.step(self._tokenizer, token_id)
        self._ids.append(token_id)
        if not piece:
            return None
        self._settled = len(self._ids)
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

    def flush(self) -> None:
        """Decode the tokens still waiting for the rest of a character (the request ended on them)."""
        if self._settled == len(self._ids):
            return
        context = self._ids[max(0, self._settled - _PRIME_TOKENS): self._settled]
        before = self._tokenizer.decode(context, skip_special_tokens=self._skip_special_tokens)
        after = self._tokenizer.decode(context + self._ids[self._settled:], skip_special_tokens=self._skip_special_tokens)
        self.text += after.removeprefix(before)
        self._settled = len(self._ids)

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
