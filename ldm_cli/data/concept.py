"""A concept the embedded model has never seen, for LoRA and textual-inversion training: a cross.

A cross is a plus sign whose arms are one third of its extent wide (`shapes.polygon_outline`),
drawn by `shapes.render` with the same seeded jitter as the grammar's shapes but never part of
the grammar, so neither the embedded model's training data nor its text encoder know it.
Captions name it by a new word (default "zorp", which the CLIP tokenizer splits into the BPE
pieces "zor" + "p", neither in any grammar caption) in the grammar's own form::

    a large red zorp in the top left, on a blue background

`ldm dataset concept` writes `concept_example`s; `ldm eval --concept WORD`
(ldm_cli.evaluation.concept_eval) asks for `concept_eval_scenes`, drawn from a seed stream of
their own and never one of the default folder's scenes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_cli.data.shapes import (
    COLOURS,
    PLACE_PHRASES,
    PLACES,
    SIZES,
    Scene,
    ShapeObject,
    render,
)

CONCEPT_SHAPE = "cross"
DEFAULT_WORD = "zorp"
DEFAULT_COUNT = 16
DEFAULT_SIZE = 64  # the embedded model's side
# Seed streams of their own: the training folder's scenes and jitter, and the evaluation's.
CONCEPT_STREAM = 0xC055
CONCEPT_EVAL_STREAM = 0xC0E7
_WORD_RE = re.compile(r"[a-z][a-z0-9]*")


def check_word(word: str) -> str:
    """The word, if it can name the concept: one lowercase word (letters, then letters or
    digits) that is none of the grammar's words; else ValueError."""
    grammar_words = {
        w
        for phrase in (*COLOURS, *SIZES, *PLACE_PHRASES.values(), "circle square triangle star")
        for w in phrase.split()
    } | {"a", "an", "and", "background"}
    if not _WORD_RE.fullmatch(word):
        raise ValueError(f"the concept word must be one lowercase word, got {word!r}")
    if word in grammar_words:
        raise ValueError(f"the concept word {word!r} is a word of the shapes grammar")
    return word


def concept_caption(scene: Scene, word: str = DEFAULT_WORD) -> str:
    """`shapes.caption` of a one-object scene with `word` for the shape's name."""
    (obj,) = scene.objects
    article = "an" if obj.size[0] in "aeiou" else "a"
    background = f"{'an' if scene.background[0] in 'aeiou' else 'a'} {scene.background}"
    return (
        f"{article} {obj.size} {obj.colour} {word} {PLACE_PHRASES[obj.place]}, "
        f"on {background} background"
    )


def _balanced(options: Sequence[str], seed: int, index: int, tag: int, stream: int) -> str:
    """options[...] such that each block of len(options) consecutive indices holds every
    option once, in an order drawn from (stream, tag, seed, block)."""
    block, slot = divmod(index, len(options))
    order = np.random.default_rng([stream, tag, seed, block]).permutation(len(options))
    return options[int(order[slot])]


def concept_scene(
    seed: int, index: int, stream: int = CONCEPT_STREAM
) -> tuple[Scene, np.random.Generator]:
    """Scene `index` of the set drawn with `seed`: one cross whose colours, places and sizes
    are balanced over each run of 8, 9 and 2 indices; its background any other colour. Also
    returns the generator that then draws the rendering's jitter."""
    colour = _balanced(tuple(COLOURS), seed, index, 0, stream)
    place = _balanced(PLACES, seed, index, 1, stream)
    size = _balanced(SIZES, seed, index, 2, stream)
    rng = np.random.default_rng([stream, 3, seed, index])
    backgrounds = [c for c in COLOURS if c != colour]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    return Scene(background, (ShapeObject(colour, CONCEPT_SHAPE, size, place),)), rng


def concept_scenes(seed: int = 0, count: int = DEFAULT_COUNT) -> frozenset[Scene]:
    """The scenes of `ldm dataset concept --seed SEED --count COUNT`, without rendering."""
    return frozenset(concept_scene(seed, i)[0] for i in range(count))


def concept_example(
    seed: int, index: int, word: str = DEFAULT_WORD, size: int = DEFAULT_SIZE
) -> tuple[Image.Image, str]:
    """(image, caption) of example `index` of the concept set drawn with `seed`."""
    scene, rng = concept_scene(seed, index)
    return render(scene, size, rng), concept_caption(scene, word)


def concept_eval_scenes(
    seed: int, num: int, exclude: frozenset[Scene] | None = None
) -> list[Scene]:
    """`num` held-out scenes of one cross, from the evaluation's stream, none in `exclude`
    (default: the scenes of the default training folder, `concept_scenes()`)."""
    exclude = concept_scenes() if exclude is None else exclude
    scenes: list[Scene] = []
    for index in range(100 * num + 100):
        if len(scenes) == num:
            break
        scene, _ = concept_scene(seed, index, stream=CONCEPT_EVAL_STREAM)
        if scene not in exclude:
            scenes.append(scene)
    return scenes


def write_concept_dataset(
    out_dir: str | Path,
    word: str = DEFAULT_WORD,
    count: int = DEFAULT_COUNT,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """`out_dir/00000.png` + `00000.txt` (its caption) per image: the kohya layout."""
    check_word(word)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(count - 1)))
    for index in range(count):
        image, text = concept_example(seed, index, word, size)
        name = f"{index:0{width}d}"
        image.save(out / f"{name}.png", compress_level=1)
        (out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
        if progress is not None:
            progress(index + 1, count)
    return out
