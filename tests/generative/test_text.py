"""The output text: incremental decoding of split characters, stop strings held back and cut, flushing."""

from __future__ import annotations

from typing import Any

from services.inference.generative.text import OutputText


def _feed(tokenizer: Any, text: str, stop: tuple[str, ...] = ()) -> tuple[OutputText, list[str], str | None]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = OutputText(tokenizer.backend_tokenizer, [tokenizer.bos_token_id], stop, skip_special_tokens=True)
    pieces = []
    matched = None
    for token in ids:
        matched = out.add(token, check_stop=True)
        pieces.append(out.take(final=matched is not None))
        if matched is not None:
            break
    return out, pieces, matched


def test_split_characters_come_out_whole(tokenizer: Any) -> None:
    text = "Ünïcödé ✓ 日本語のテキスト and ascii"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode()) // 2, "the tiny vocabulary splits characters into bytes"
    _, pieces, _ = _feed(tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens completed no character yet


def test_a_possible_stop_string_is_held_back_then_cut(tokenizer: Any) -> None:
    out, pieces, matched = _feed(tokenizer, "The quick brown fox jumps", stop=("fox j",))
    assert matched == "fox j"
    assert "".join(pieces) == out.text == "The quick brown "
    sent = ""
    for piece in pieces:
        sent += piece
        assert "The quick brown ".startswith(sent)


def test_held_back_text_is_released_when_it_is_not_a_stop_string(tokenizer: Any) -> None:
    _, pieces, matched = _feed(tokenizer, "The quick brown", stop=("quick brown cat",))
    assert matched is None and "".join(pieces) == "The "  # "quick brown" may still become the stop string
    out, pieces, matched = _feed(tokenizer, "The quick brown fox jumps", stop=("quick brown cat",))
    assert matched is None and "".join(pieces) == "The quick brown fox jumps"  # "fox" settled it
    out, pieces, _ = _feed(tokenizer, "The quick brown", stop=("quick brown cat",))
    assert "".join(pieces) + out.take(final=True) == "The quick brown"  # the end releases everything


def test_earliest_of_several_stop_strings_wins(tokenizer: Any) -> None:
    out, _, matched = _feed(tokenizer, "for i in range(10):", stop=("range", "in r", "10"))
    assert matched == "in r" and out.text == "for i "


def test_flush_decodes_an_unfinished_character_like_a_full_decode(tokenizer: Any) -> None:
    ids = tokenizer("a ✓", add_special_tokens=False)["input_ids"]
    out = OutputText(tokenizer.backend_tokenizer, [], (), skip_special_tokens=True)
    for token in ids[:-1]:  # the last byte of the check mark is missing
        out.add(token, check_stop=False)
    assert out.take(final=False) == "a "
    out.flush()
    assert out.take(final=True) == tokenizer.decode(ids[:-1])[2:]
    assert out.text == tokenizer.decode(ids[:-1]) and out.text.endswith("\ufffd")
