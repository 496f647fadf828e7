"""The pure-Python CLIP tokenizer against transformers' CLIPTokenizer, SD's reference tokenizer
folders and open_clip's original."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import ftfy
import pytest
import torch
from transformers import CLIPTokenizer

from ldm_cli.text.tokenizer import (
    OPENCLIP_PAD_ID,
    ClipTokenizer,
    bpe_table_path,
    get_tokenizer,
    load_vocab_and_merges,
)

# ftfy leaves these unchanged, so transformers 5 (which has no ftfy step) is an exact oracle.
PLAIN = [
    "",
    " ",
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT",
    "  multiple   spaces\tand\ttabs\nnewlines  ",
    "(masterpiece:1.2), best quality, [ugly:0.8]",
    "((detailed)), {soft light}, (word:1.2)",
    "café crème brûlée",
    "naïve façade jalapeño",
    "Ångström Øresund straße",
    "東京の夜景",
    "한국어 텍스트",
    "Москва зимой",
    "مرحبا بالعالم",
    "emoji 😀🎉🚀 and ❤️",
    "👩\u200d👩\u200d👧 family",
    "numbers 1234567890 3.14159 1e-5 -42",
    "punctuation: ;,.?'\"`~@#$%^&*_+=-/\\|<>[]{}",
    "it's don't we're they've I'm we'll he'd",
    "cat&dog & friends",
    "non\u00a0breaking space and zero\u200bwidth",
    " ".join(["word"] * 100),
    "supercalifragilisticexpialidocious " * 20,
    "a, " * 60,
    "Straße İstanbul",
    "8k uhd, f/1.8, 35mm, 16:9, 1,000,000 $5.99 50%",
    "don't DON'T it'S rock'n'roll ''quoted'' 'single'",
    "\t\n  ",
]
# diffusers' SD 2.x tokenizer makes "!" a special token; the original (open_clip) does not.
EXCLAIMING = ["hello world!!! what?!", "!"]
# Prompts that spell the special tokens; open_clip names its specials differently.
SPECIAL_LITERALS = [
    "<|endoftext|> inside",
    "x<|startoftext|>y",
    "A <|ENDOFTEXT|> b",
    "x<|ENDOFTEXT|>'s <|Startoftext|>>",
    "<|endoftext|><|endoftext|>",
]
# ftfy changes these: HTML entities, ligatures, curly quotes, full width, mojibake, control chars.
NEEDS_FTFY = [
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot;",
    "ﬁne ligature",
    "“curly quotes” and ‘single’",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "cafÃ© mojibake",
    "tab\x0bvt",
    "e\u0301 combining accent",
    "line\r\nbreaks\rand \x1b[31mterminal\x1b[0m escapes",
    "AT&amp;T &#x1F600; &eacute;",
]
LENGTH = 77


@pytest.fixture(scope="session")
def sd15_reference():
    """transformers' tokenizer on the same vocabulary and merges (SD 1.x's tokenizer folder; the
    test below holds them equal to its files)."""
    vocab, merges = load_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="session")
def sd21_reference(reference_dir):
    return CLIPTokenizer.from_pretrained(
        os.path.join(reference_dir, "sd21", "tokenizer"), local_files_only=True
    )


@pytest.fixture(scope="session")
def open_clip_tokenizer():
    """OpenAI's original tokenizer code as open_clip ships it, loaded without open_clip's
    package import (which would pull torchvision and timm)."""
    path = bpe_table_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(context_length=LENGTH)


def reference_ids(reference: CLIPTokenizer, text: str) -> list[int]:
    return reference(text, padding="max_length", max_length=LENGTH, truncation=True).input_ids


def test_properties():
    tok = get_tokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49408, 49406, 49407, 49407)
    assert tok.max_length == LENGTH
    assert get_tokenizer(0).pad_id == 0
    assert get_tokenizer() is get_tokenizer(49407)
    assert get_tokenizer(0) is not get_tokenizer()


def test_vocab_and_merges_equal_the_reference_files(reference_dir):
    vocab, merges = load_vocab_and_merges()
    for model in ("sd15", "sd21"):
        folder = os.path.join(reference_dir, model, "tokenizer")
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            assert vocab == json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            lines = f.read().split("\n")
        assert lines[0].startswith("#version")
        assert [f"{a} {b}" for a, b in merges] == [line for line in lines[1:] if line]
    assert len(vocab) == 49408 and list(vocab.values()) == list(range(49408))


@pytest.mark.parametrize("text", PLAIN + EXCLAIMING + SPECIAL_LITERALS)
def test_sd1_ids_equal_reference(sd15_reference, text):
    assert ftfy.fix_text(text) == text
    ours = get_tokenizer()([text])
    assert ours.dtype == torch.long and ours.shape == (1, LENGTH)
    assert ours[0].tolist() == reference_ids(sd15_reference, text)


@pytest.mark.parametrize("text", PLAIN)
def test_openclip_padding_ids_equal_sd21_reference(sd21_reference, text):
    assert get_tokenizer(0)([text])[0].tolist() == reference_ids(sd21_reference, text)


@pytest.mark.parametrize("text", NEEDS_FTFY)
def test_text_is_cleaned_with_ftfy_like_transformers_4(sd15_reference, text):
    assert get_tokenizer()([text])[0].tolist() == reference_ids(sd15_reference, ftfy.fix_text(text))


def test_fix_text_off_matches_transformers_5(sd15_reference):
    tok = ClipTokenizer(fix_text=False)
    texts = PLAIN + NEEDS_FTFY
    expected = [reference_ids(sd15_reference, text) for text in texts]
    assert tok(texts).tolist() == expected


def test_openclip_padding_equals_open_clip_original(open_clip_tokenizer):
    texts = PLAIN + EXCLAIMING + NEEDS_FTFY
    assert torch.equal(get_tokenizer(0)(texts), open_clip_tokenizer(texts))


def test_batch_and_single_string():
    tok = get_tokenizer()
    batch = tok(["a cat", "a dog on a long walk"])
    assert batch.shape == (2, LENGTH)
    assert torch.equal(tok("a cat"), batch[:1])
    assert batch[0, :4].tolist() == [tok.bos_id, 320, 2368, tok.eos_id]
    assert (batch[0, 4:] == tok.pad_id).all()
    assert get_tokenizer(0)([""])[0, :3].tolist() == [49406, 49407, 0]


def test_encode_ids_are_raw_and_untruncated():
    tok = get_tokenizer()
    text = "a castle on a hill, " * 30
    ids = tok.encode_ids(text)
    assert len(ids) == 6 * 30
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok([text])[0].tolist() == [tok.bos_id, *ids[: LENGTH - 2], tok.eos_id]
    assert tok.encode_ids("") == []
    assert tok.decode(tok.encode_ids("A Castle, on a HILL!")) == "a castle , on a hill !"


def random_texts(count: int, seed: int) -> list[str]:
    """Strings mixing every character class the split pattern and the normalizer treat apart."""
    pieces = [
        *"aZéÉßΣσİıǅ東京한ё٣٤5",
        *"0123456789",
        *" \t\n\u00a0\u3000\u2028",
        *".,!?;:'\"-_()[]{}<>|/\\@#$%^*+=~`",
        "'s",
        "'T",
        "'re",
        "'LL",
        "'d",
        "😀",
        "👩\u200d👩\u200d👧",
        "❤️",
        "e\u0301",
        "\u200b",
        "<|startoftext|>",
        "<|endoftext|>",
        "<|EndOfText|>",
        "<|",
        "|>",
        "photo",
        "Castle",
        "ASTRONAUT",
        "1.5",
        "8k",
    ]
    generator = random.Random(seed)
    return ["".join(generator.choices(pieces, k=generator.randrange(0, 40))) for _ in range(count)]


def test_random_texts_equal_transformers(sd15_reference):
    tok = ClipTokenizer(fix_text=False)
    for text in random_texts(400, seed=0):
        expected = sd15_reference(text, add_special_tokens=False).input_ids
        assert tok.encode_ids(text) == expected, repr(text)


def test_padded_batches_equal_transformers(sd15_reference):
    texts = PLAIN + SPECIAL_LITERALS + random_texts(50, seed=1)
    expected = sd15_reference(
        texts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt"
    )
    assert torch.equal(ClipTokenizer(fix_text=False)(texts), expected.input_ids)
    zero_padded = expected.input_ids.masked_fill(expected.attention_mask == 0, 0)
    assert torch.equal(ClipTokenizer(OPENCLIP_PAD_ID, fix_text=False)(texts), zero_padded)


def test_long_prompts_keep_the_first_75_ids():
    tok = get_tokenizer()
    ids = tok([" ".join(["word"] * 100)])[0].tolist()
    assert ids == [tok.bos_id, *[2653] * 75, tok.eos_id]


def test_decode_equals_transformers(sd15_reference):
    tok = get_tokenizer()
    generator = random.Random(2)
    for _ in range(300):
        ids = [generator.randrange(tok.vocab_size) for _ in range(generator.randrange(0, 20))]
        assert tok.decode(ids) == sd15_reference.decode(ids, skip_special_tokens=True), ids
    for text in PLAIN + NEEDS_FTFY:
        ids = tok.encode_ids(text)
        assert tok.decode(ids) == sd15_reference.decode(ids, skip_special_tokens=True)


def test_plain_ascii_is_not_passed_through_ftfy(monkeypatch):
    tok = ClipTokenizer()
    monkeypatch.setattr(ftfy, "fix_text", lambda text: pytest.fail(f"ftfy called on {text!r}"))
    for text in ["a photo, 8k (detailed:1.2)", "tabs\tand\r\nbreaks", ""]:
        assert tok.clean(text) == text


def test_capital_sigma_lowercases_per_character_like_transformers(
    sd15_reference, open_clip_tokenizer
):
    # tokenizers lowercases each character alone, so a word-final Σ becomes σ, not the ς of
    # str.lower (open_clip): the one place where SD 1.x and open_clip's tokenizers differ here.
    text = "ΟΔΟΣ ΣΑΣ"
    ours = get_tokenizer()([text])[0].tolist()
    assert ours == reference_ids(sd15_reference, text)
    assert not torch.equal(get_tokenizer(0)([text]), open_clip_tokenizer([text]))
    assert torch.equal(get_tokenizer(0)([text.lower()]), open_clip_tokenizer([text]))
