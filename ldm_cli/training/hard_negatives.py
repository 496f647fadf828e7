"""Hard negative captions for the contrastive text stage (NegCLIP's idea, Yuksekgonul et al.,
"When and why vision-language models behave like bags-of-words", 2023).

In a random batch two captions almost never differ in one word only, so CLIP's loss is met by
the attributes that are easiest to see (colours, places) and the text encoder learns to ignore
the rest: trained without these, the embedded encoder mapped "circle" and "square" to almost the
same features, and the U-Net conditioned on it drew one blob for both. Each image therefore
also meets its own caption with one attribute word replaced (or two swapped between objects),
which the loss must rank below the true caption.

Works on any caption: words outside the attribute groups are never touched, and a caption
with nothing to replace has no negative.
"""

from __future__ import annotations

import re

import torch

from ldm_cli.data.shapes import COLOURS, SHAPES, SIZES

# Interchangeable words, and how often a negative changes each group when the caption has it:
# shape most, as the attribute that the easy cues leave unlearnt.
WORD_GROUPS: dict[str, tuple[tuple[str, ...], float]] = {
    "shape": (SHAPES, 0.45),
    "colour": (tuple(COLOURS), 0.2),
    "size": (SIZES, 0.15),
    "side": (("left", "right"), 0.1),
    "height": (("top", "bottom"), 0.1),
}
_WORD = re.compile(r"[a-z]+")


def _groups_of(words: list[str]) -> dict[str, list[int]]:
    """Positions of each group's words in the caption."""
    found: dict[str, list[int]] = {}
    for i, word in enumerate(words):
        for group, (members, _) in WORD_GROUPS.items():
            if word in members:
                found.setdefault(group, []).append(i)
    return found


def _fix_articles(text: str) -> str:
    """ "a orange" -> "an orange", "an red" -> "a red" after a replacement."""
    return re.sub(
        r"\b(a|an) ([a-z]+)",
        lambda m: ("an " if m.group(2)[0] in "aeiou" else "a ") + m.group(2),
        text,
    )


def _pick(count: int, generator: torch.Generator) -> int:
    return int(torch.randint(count, (), generator=generator))


def hard_negative(caption: str, generator: torch.Generator) -> str | None:
    """The caption with one attribute changed, or None when it has no attribute words."""
    spans = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(caption.lower())]
    words = [w for _, _, w in spans]
    found = _groups_of(words)
    if not found:
        return None
    names = list(found)
    weights = torch.tensor([WORD_GROUPS[g][1] for g in names])
    group = names[int(torch.multinomial(weights, 1, generator=generator))]
    members = WORD_GROUPS[group][0]
    positions = found[group]
    first = positions[_pick(len(positions), generator)]
    partners = [i for i in positions if words[i] != words[first]]
    if partners and torch.rand((), generator=generator) < 0.5:
        # two different words of the group trade places: the binding changes, not the set
        second = partners[_pick(len(partners), generator)]
        replacement = {first: words[second], second: words[first]}
    else:
        others = [w for w in members if w != words[first]]
        replacement = {first: others[_pick(len(others), generator)]}
    pieces, last = [], 0
    for i, (start, end, _) in enumerate(spans):
        if i in replacement:
            pieces += [caption[last:start], replacement[i]]
            last = end
    pieces.append(caption[last:])
    return _fix_articles("".join(pieces))


def hard_negatives(
    captions: list[str], generator: torch.Generator
) -> tuple[list[str], torch.Tensor]:
    """One negative per caption (the caption itself where it has none) and a mask of which are
    real negatives."""
    negatives = [hard_negative(c, generator) for c in captions]
    mask = torch.tensor([n is not None for n in negatives], dtype=torch.bool)
    return [n if n is not None else c for n, c in zip(negatives, captions, strict=True)], mask


def swapped_word(caption: str, group: str) -> str | None:
    """Deterministic negative for evaluation: the first word of ``group`` replaced by the
    group's next word (cyclically); None when the caption has none."""
    members = WORD_GROUPS[group][0]
    for match in _WORD.finditer(caption.lower()):
        if match.group() in members:
            word = members[(members.index(match.group()) + 1) % len(members)]
            return _fix_articles(caption[: match.start()] + word + caption[match.end() :])
    return None
