"""The OpenAI door's text events come from a per-answer template: byte for byte what encoding the
whole chunk object gives, for completions and chat, with and without usage, for any text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.openai_schema import Answer, GenerationAsk, sse

TEXTS = ["a", " tok", 'quote " and \\ backslash', "line\nbreak\ttab", "é ü 漢字 🙂", "\u2028\u2029", "\x00\x1f",
         "\ue000aiaas-text\ue000", "</script>", ""]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("usage", [False, True])
def test_text_events_equal_the_encoded_chunk(chat: bool, usage: bool) -> None:
    answer = Answer(GenerationAsk(chat=chat, model="m\"odel", stream=True, include_usage=usage))
    for text in TEXTS:
        if not text:
            continue  # the door sends no event for an empty text
        event = answer.text_event(text)
        assert event == sse(answer.chunk(text))
        body = json.loads(event.decode().removeprefix("data: "))
        assert (body["choices"][0]["delta"]["content"] if chat else body["choices"][0]["text"]) == text


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_any_text_is_encoded_as_the_chunk_would_be(text: str) -> None:
    answer = Answer(GenerationAsk(chat=True, model="m", stream=True))
    assert answer.text_event(text) == sse(answer.chunk(text))
