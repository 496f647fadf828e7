"""Prompts to 77-token chunks: long prompts, BREAK, the comma rule, per-token weights."""

from __future__ import annotations

import pytest

from ldm_cli.text.chunks import empty_chunk, prompt_chunks, weighted_chunks
from ldm_cli.text.tokenizer import CHUNK_TOKENS, OPENCLIP_PAD_ID, SD1_PAD_ID, get_tokenizer


@pytest.fixture(params=[SD1_PAD_ID, OPENCLIP_PAD_ID], ids=["sd1-pad", "openclip-pad"])
def tokenizer(request):
    return get_tokenizer(request.param)


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)


@pytest.mark.parametrize("prompt", ["", "a red circle", words(75), "a photo, 4k, (detailed)"])
def test_a_prompt_of_at_most_75_tokens_is_the_tokenizers_row(tokenizer, prompt):
    plain = prompt.replace("(", "").replace(")", "")
    (chunk,) = prompt_chunks(tokenizer, plain)
    assert list(chunk.ids) == tokenizer(plain)[0].tolist()
    assert not chunk.emphasized


def test_150_tokens_make_two_full_chunks(tokenizer):
    assert len(tokenizer.encode_ids(words(150))) == 150
    first, second = prompt_chunks(tokenizer, words(150))
    cat = tokenizer.encode_ids("cat")[0]
    for chunk in (first, second):
        assert len(chunk.ids) == len(chunk.weights) == 77
        assert chunk.ids == (tokenizer.bos_id, *[cat] * CHUNK_TOKENS, tokenizer.eos_id)


def test_76_tokens_spill_one_into_a_padded_second_chunk(tokenizer):
    first, second = prompt_chunks(tokenizer, words(76))
    assert first.ids[-1] == tokenizer.eos_id
    assert second.ids[:3] == (tokenizer.bos_id, tokenizer.encode_ids("cat")[0], tokenizer.eos_id)
    assert set(second.ids[3:]) == {tokenizer.pad_id}


def test_break_starts_a_new_chunk(tokenizer):
    a, b = prompt_chunks(tokenizer, "a red circle BREAK a blue square")
    assert list(a.ids) == tokenizer("a red circle")[0].tolist()
    assert list(b.ids) == tokenizer("a blue square")[0].tolist()
    # BREAK twice leaves an empty chunk between; BREAK inside a word is a word
    assert len(prompt_chunks(tokenizer, "a BREAK BREAK b")) == 3
    assert len(prompt_chunks(tokenizer, "BREAKING news")) == 1


def test_text_after_a_comma_moves_to_the_next_chunk_when_it_is_near_the_end(tokenizer):
    prompt = words(70) + ", " + words(10, "dog")
    first, second = prompt_chunks(tokenizer, prompt)
    comma, dog = tokenizer.encode_ids(","), tokenizer.encode_ids("dog")
    assert first.ids[71:73] == (*comma, tokenizer.eos_id)  # 70 cats, the comma, then end
    assert second.ids[1:12] == (*dog * 10, tokenizer.eos_id)
    # without the rule (A1111's setting at 0) the chunk is cut at 75 tokens
    hard = weighted_chunks(tokenizer, [(prompt, 1.0)], comma_backtrack=0)
    assert hard[0].ids[75] == dog[0] and hard[1].ids[1:8] == (*dog * 6, tokenizer.eos_id)


def test_a_comma_more_than_20_tokens_back_does_not_move_text(tokenizer):
    prompt = words(50) + ", " + words(30, "dog")
    first, second = prompt_chunks(tokenizer, prompt)
    assert first.ids[-2] == tokenizer.encode_ids("dog")[0]
    assert second.ids[1:8] == (*tokenizer.encode_ids("dog") * 6, tokenizer.eos_id)


def test_token_weights_follow_the_emphasis(tokenizer):
    (chunk,) = prompt_chunks(tokenizer, "a (red:1.5) [big] circle")
    assert chunk.weights[:6] == (1.0, 1.0, 1.5, 1 / 1.1, 1.0, 1.0)
    assert set(chunk.weights[6:]) == {1.0}
    assert chunk.emphasized


def test_empty_chunk_is_the_empty_prompts_row(tokenizer):
    assert list(empty_chunk(tokenizer).ids) == tokenizer("")[0].tolist()
