"""IncrementalDetokenizer against the tiny model's byte-level BPE: pieces are final, whole
characters, and add up to `tokenizer.decode` of the whole output."""

from __future__ import annotations

import pytest

from services.gateway.detokenizer import IncrementalDetokenizer

TEXT = "Héllo wörld — 世界 🎉 naïve café; ünïcödé at the end: 日本"


@pytest.fixture(scope="module")
def tok(model_info):
    return model_info.tokenizer


def pieces_of(tok, ids, prompt=(), skip_special_tokens=True, chunk=1):
    detok = IncrementalDetokenizer(tok, list(prompt), skip_special_tokens)
    pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return pieces, detok.flush()


def test_the_text_really_splits_characters_across_tokens(tok):
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # otherwise this file tests nothing


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_pieces_are_whole_characters_and_add_up(tok, chunk):
    ids = tok.encode(TEXT)
    pieces, rest = pieces_of(tok, ids, prompt=tok.encode("Prompt: 世"), chunk=chunk)
    assert not any("\ufffd" in p for p in pieces)
    assert rest == ""
    assert "".join(pieces) == tok.decode(ids) == TEXT


def test_no_text_is_held_longer_than_a_character(tok):
    ids = tok.encode("ab 🎉")
    detok = IncrementalDetokenizer(tok)
    emitted = ""
    for i, t in enumerate(ids):
        emitted += detok.add([t])
        # whatever decodes cleanly so far has been emitted already
        so_far = tok.decode(ids[: i + 1])
        if not so_far.endswith("\ufffd"):
            assert emitted == so_far


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    end = tok.token_to_id("<|im_end|>")
    start = tok.token_to_id("<|im_start|>")
    ids = [start, *tok.encode("hi 世界"), end, *tok.encode(" more")]
    pieces, rest = pieces_of(tok, ids, skip_special_tokens=skip)
    text = "".join(pieces) + rest
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


def test_flush_emits_an_incomplete_character(tok):
    ids = tok.encode("x 🎉")
    cut = next(i for i in range(len(ids), 0, -1) if tok.decode(ids[:i]).endswith("\ufffd"))
    pieces, rest = pieces_of(tok, ids[:cut])
    assert "".join(pieces) + rest == tok.decode(ids[:cut])
    assert rest.endswith("\ufffd") and not any("\ufffd" in p for p in pieces)


def test_long_outputs_keep_a_short_window(tok):
    ids = tok.encode("word " * 400)
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    text = "".join(detok.add([t]) for t in ids)
    assert text == tok.decode(ids)
    assert len(detok._tokens) < 10
