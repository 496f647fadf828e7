"""Hard negative captions of the text stage and the loss that uses them."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from ldm_cli.core.config import TextConfig
from ldm_cli.models.clip_tower import ClipModel
from ldm_cli.training.hard_negatives import WORD_GROUPS, hard_negative, hard_negatives, swapped_word

CAPTION = (
    "a small red circle in the top left and a large blue square on the right, "
    "on a yellow background"
)
TINY_TEXT = TextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text)


def _group_of(word: str) -> str | None:
    return next((g for g, (members, _) in WORD_GROUPS.items() if word in members), None)


def test_a_negative_changes_only_words_of_one_attribute_group():
    generator = torch.Generator().manual_seed(0)
    groups_changed = Counter()
    for _ in range(300):
        negative = hard_negative(CAPTION, generator)
        assert negative is not None and negative != CAPTION
        before, after = _words(CAPTION), _words(negative)
        assert len(before) == len(after)
        changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        groups = {_group_of(b) for b, _ in changed} | {_group_of(a) for _, a in changed}
        assert len(groups) == 1 and None not in groups, (CAPTION, negative)
        assert 1 <= len(changed) <= 2
        if len(changed) == 2:  # a swap between the two objects keeps the set of words
            assert Counter(b for b, _ in changed) == Counter(a for _, a in changed)
        groups_changed[groups.pop()] += 1
    # shape is changed most often, every group sometimes
    assert groups_changed.most_common(1)[0][0] == "shape"
    assert set(groups_changed) == set(WORD_GROUPS)


def test_articles_follow_the_new_word():
    generator = torch.Generator().manual_seed(1)
    seen_orange = False
    for _ in range(400):
        negative = hard_negative("a large red star in the center, on a white background", generator)
        assert "a orange" not in negative and "an red" not in negative
        seen_orange |= "an orange" in negative
    assert seen_orange


def test_captions_without_attribute_words_have_no_negative():
    generator = torch.Generator().manual_seed(0)
    assert hard_negative("a photo of a dog", generator) is None
    negatives, mask = hard_negatives(["a photo of a dog", CAPTION], generator)
    assert negatives[0] == "a photo of a dog" and mask.tolist() == [False, True]


def test_negatives_are_reproducible_from_the_generator():
    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return [hard_negative(CAPTION, generator) for _ in range(20)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_evaluation_swap_is_deterministic():
    assert swapped_word(CAPTION, "shape") == CAPTION.replace("red circle", "red square", 1)
    assert swapped_word("a large purple star on the left, on a red background", "shape") == (
        "a large purple circle on the left, on a red background"
    )
    assert swapped_word("a photo of a dog", "shape") is None


@pytest.fixture(scope="module")
def clip_batch():
    from ldm_cli.text.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = ClipModel(TINY_TEXT).eval()
    tokenizer = get_tokenizer(TINY_TEXT.pad_token_id)
    captions = [CAPTION, "a large green star in the center, on a black background", "a dog"]
    negatives, mask = hard_negatives(captions, torch.Generator().manual_seed(0))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    return model, images, tokenizer(captions), tokenizer(negatives), mask


def test_masked_negatives_leave_clip_loss_unchanged(clip_batch):
    model, images, tokens, negative_tokens, _ = clip_batch
    with torch.no_grad():
        plain = model(images, tokens)
        masked = model(images, tokens, negative_tokens, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-6)


def test_negatives_add_to_the_image_side_of_the_loss(clip_batch):
    model, images, tokens, negative_tokens, mask = clip_batch
    with torch.no_grad():
        plain = model(images, tokens)
        with_negatives = model(images, tokens, negative_tokens, mask)
        scale = model.heads.logit_scale.exp()
        image = model.heads.image_embeddings(images)
        text = model.heads.text_embeddings(model.text_encoder.pooled(tokens))
        negative = model.heads.text_embeddings(model.text_encoder.pooled(negative_tokens))
        logits = scale * text @ image.T
        extra = (scale * image @ negative.T).masked_fill(~mask[None, :], -torch.inf)
        targets = torch.arange(3)
        expected = (
            torch.nn.functional.cross_entropy(logits, targets)
            + torch.nn.functional.cross_entropy(torch.cat([logits.T, extra], 1), targets)
        ) / 2
    assert with_negatives > plain
    torch.testing.assert_close(with_negatives, expected)
