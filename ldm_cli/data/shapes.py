"""Procedural captioned scenes of coloured shapes: scene model, caption grammar and renderer.

A scene is a background colour plus one or two objects, each a (size, colour, shape, place).
Captions follow the grammar in docs/shapes-grammar.md; ``parse_caption`` inverts ``caption``.
Every object sits in its own cell of a 3x3 grid and is drawn small enough that two objects
never touch, so the place named in the caption is never ambiguous.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Far apart in RGB and in CIELAB (smallest Lab distance: blue/purple, ~40), so a nearest-colour
# classifier can tell them apart even on blurry generated images.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 90, 230),
    "yellow": (245, 215, 30),
    "orange": (245, 135, 20),
    "purple": (150, 40, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# Shapes `render` can draw that the grammar (captions, random scenes, the embedded model's
# training data) never uses: the new concept of `ldm dataset concept` (ldm_cli.data.concept).
EXTRA_SHAPES = ("cross",)
SIZES = ("small", "large")
# place -> (column, row) of its cell in the 3x3 grid
PLACE_CELLS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
PLACES = tuple(PLACE_CELLS)
PLACE_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    "top left": "in the top left",
    "top right": "in the top right",
    "bottom left": "in the bottom left",
    "bottom right": "in the bottom right",
}

# Whole colour-shape pairs that training scenes never contain (4 of the 32 pairs). Each shape
# and each of these colours still appears in training with other partners, so a model that
# generalises compositionally can draw them.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("purple", "triangle"),
        ("orange", "star"),
        ("green", "square"),
        ("white", "circle"),
    }
)

# Half-extent of an object along x and y as a fraction of the canvas side. A large object
# with the largest jitter reaches 0.165 of the side from its cell centre: objects in
# neighbouring cells stay at least 0.003 of the side apart, and 0.0016 inside the canvas. Small
# objects are as large as that allows: at 64 px a small object is 14 px across, and at the
# earlier 0.09 (11 px) the corners of small stars and circles' roundness did not survive the
# embedded f=4 VAE (its round trip kept 76% of shapes, against 87% at these sizes).
SIZE_EXTENT = {"small": 0.11, "large": 0.155}
EXTENT_JITTER = (0.9, 1.0)
POSITION_JITTER = 0.01
ROTATION_JITTER_DEGREES = 10.0
# Circumradius per unit of half-extent: a square turned by up to 10 degrees spans
# (cos + sin)(10 deg) = 1.158 half-sides, i.e. 1.158 / sqrt(2) of its circumradius.
SHAPE_CIRCUMRADIUS = {"circle": 1.0, "square": math.sqrt(2) / 1.158, "triangle": 1.0, "star": 1.0}
STAR_INNER_RATIO = 0.45
# A cross (plus sign) has arms one third of its extent wide: its 8 outer corners sit
# atan(1/3) = 18.4 degrees either side of an axis, so turned by up to 10 degrees it spans
# cos(18.4 - 10 deg) of its circumradius.
CROSS_ARM_RATIO = 1 / 3
_CROSS_CORNER = math.atan(CROSS_ARM_RATIO)
SHAPE_CIRCUMRADIUS["cross"] = 1 / math.cos(_CROSS_CORNER - math.radians(ROTATION_JITTER_DEGREES))
SUPERSAMPLE = 4

# Seed streams: training data and in-distribution evaluation scenes never share random draws.
TRAIN_STREAM = 0x5EED
CAPTION_STREAM = 0xCA97
EVAL_STREAM = 0xE7A1


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    place: str

    def __post_init__(self) -> None:
        for value, allowed, kind in (
            (self.colour, COLOURS, "colour"),
            (self.shape, SHAPES + EXTRA_SHAPES, "shape"),
            (self.size, SIZES, "size"),
            (self.place, PLACE_CELLS, "place"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {kind} {value!r}")


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.background not in COLOURS:
            raise ValueError(f"unknown colour {self.background!r}")
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        if len({obj.place for obj in self.objects}) != len(self.objects):
            raise ValueError("two objects share a place")


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    scene: Scene
    heldout: bool


# ---------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: ShapeObject, with_size: bool = True, with_place: bool = True) -> str:
    words = f"{obj.size} {obj.colour}" if with_size else obj.colour
    phrase = f"{_article(words)} {words} {obj.shape}"
    return f"{phrase} {PLACE_PHRASES[obj.place]}" if with_place else phrase


def caption(scene: Scene, with_size: bool = True, with_place: bool = True) -> str:
    """The full caption; training captions sometimes leave out sizes and/or places ("a red
    circle on a blue background"), so such short prompts work too. Evaluation uses full ones.
    """
    objects = " and ".join(_object_phrase(o, with_size, with_place) for o in scene.objects)
    comma = "," if with_place else ""
    return f"{objects}{comma} on {_article(scene.background)} {scene.background} background"


def _alternatives(words) -> str:
    # longest first so "top left" wins over "top"
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE_TO_PLACE = {phrase: place for place, phrase in PLACE_PHRASES.items()}
_OBJECT_PATTERN = (
    rf"an? (?P<size{{i}}>{_alternatives(SIZES)}) (?P<colour{{i}}>{_alternatives(COLOURS)}) "
    rf"(?P<shape{{i}}>{_alternatives(SHAPES)}) (?P<place{{i}}>{_alternatives(_PHRASE_TO_PLACE)})"
)
_CAPTION_RE = re.compile(
    _OBJECT_PATTERN.format(i=0)
    + rf"(?: and {_OBJECT_PATTERN.format(i=1)})?"
    + rf",? on an? (?P<background>{_alternatives(COLOURS)}) background"
)


def parse_caption(text: str) -> Scene:
    """Inverse of ``caption``; tolerant of case, extra spaces, "centre" and a final full stop."""
    normalised = " ".join(text.lower().replace("centre", "center").split()).rstrip(".")
    match = _CAPTION_RE.fullmatch(normalised)
    if match is None:
        raise ValueError(f"not a shapes caption: {text!r}")
    objects = []
    for i in (0, 1):
        if match.group(f"shape{i}") is None:
            continue
        objects.append(
            ShapeObject(
                colour=match.group(f"colour{i}"),
                shape=match.group(f"shape{i}"),
                size=match.group(f"size{i}"),
                place=_PHRASE_TO_PLACE[match.group(f"place{i}")],
            )
        )
    return Scene(background=match.group("background"), objects=tuple(objects))


# ---------------------------------------------------------------- sampling


def is_heldout(obj: ShapeObject) -> bool:
    return (obj.colour, obj.shape) in HELDOUT_PAIRS


def scene_is_heldout(scene: Scene) -> bool:
    return any(is_heldout(obj) for obj in scene.objects)


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _random_object(rng, background, taken_colours, taken_places, allow_heldout):
    while True:
        obj = ShapeObject(
            colour=_pick(rng, (c for c in COLOURS if c != background and c not in taken_colours)),
            shape=_pick(rng, SHAPES),
            size=_pick(rng, SIZES),
            place=_pick(rng, (p for p in PLACES if p not in taken_places)),
        )
        if allow_heldout or not is_heldout(obj):
            return obj


def random_scene(rng: np.random.Generator, allow_heldout: bool = False) -> Scene:
    """One or two objects (equally likely) of different colours, none the background colour."""
    background = _pick(rng, COLOURS)
    objects: list[ShapeObject] = []
    for _ in range(1 + int(rng.integers(2))):
        objects.append(
            _random_object(
                rng,
                background,
                {o.colour for o in objects},
                {o.place for o in objects},
                allow_heldout,
            )
        )
    return Scene(background=background, objects=tuple(objects))


def heldout_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """``n`` scenes, each with at least one held-out colour-shape pair."""
    pairs = sorted(HELDOUT_PAIRS)
    scenes = []
    for _ in range(n):
        colour, shape = _pick(rng, pairs)
        background = _pick(rng, (c for c in COLOURS if c != colour))
        heldout = ShapeObject(colour, shape, _pick(rng, SIZES), _pick(rng, PLACES))
        objects = [heldout]
        if rng.integers(2):
            objects.append(
                _random_object(rng, background, {colour}, {heldout.place}, allow_heldout=True)
            )
            if rng.integers(2):
                objects.reverse()
        scenes.append(Scene(background=background, objects=tuple(objects)))
    return scenes


EVAL_MIXES = ("half", "grammar")


def training_scene(seed: int, index: int) -> tuple[Scene, np.random.Generator]:
    """Scene `index` of the dataset drawn with `seed`, and its generator, which then draws the
    rendering's jitter."""
    rng = np.random.default_rng([TRAIN_STREAM, seed, index])
    return random_scene(rng, allow_heldout=False), rng


def training_scenes(seed: int, num: int) -> frozenset[Scene]:
    """The scenes of `ldm dataset shapes --seed SEED --num NUM`, drawn without rendering."""
    return frozenset(training_scene(seed, i)[0] for i in range(num))


def sample_eval_prompts(
    seed: int,
    n: int,
    heldout_fraction: float = 0.5,
    mix: str = "grammar",
    exclude: frozenset[Scene] = frozenset(),
) -> list[EvalPrompt]:
    """Deterministic evaluation prompts from a seed stream that training never uses, none of
    whose scenes is in `exclude` (the training set's: `training_scenes`).

    mix "half": in-distribution scenes followed by `heldout_fraction` of scenes with a held-out
    pair. mix "grammar": every scene drawn as the dataset draws them but with nothing held out,
    so held-out pairs come at the grammar's own rate (4 of its 32 colour-shape pairs)."""
    rng = np.random.default_rng([EVAL_STREAM, seed])
    if mix == "grammar":
        scenes = _new_scenes(rng, n, exclude, allow_heldout=True)
    elif mix == "half":
        num_heldout = round(n * heldout_fraction)
        scenes = _new_scenes(rng, n - num_heldout, exclude, allow_heldout=False)
        scenes += heldout_scenes(rng, num_heldout)  # never in a training set
    else:
        raise ValueError(f"unknown eval mix {mix!r}; one of {', '.join(EVAL_MIXES)}")
    return [EvalPrompt(caption(s), s, scene_is_heldout(s)) for s in scenes]


def _new_scenes(rng, n: int, exclude: frozenset[Scene], allow_heldout: bool) -> list[Scene]:
    scenes: list[Scene] = []
    for _ in range(1000 * n + 1000):
        if len(scenes) == n:
            return scenes
        scene = random_scene(rng, allow_heldout)
        if scene not in exclude:
            scenes.append(scene)
    raise ValueError(f"could not draw {n} scenes outside the {len(exclude)} excluded ones")


# ---------------------------------------------------------------- rendering


def polygon_outline(shape: str, cx: float, cy: float, radius: float, rotation: float):
    """Polygon vertices (image coordinates, y down) of a non-circle shape pointing up."""
    if shape == "square":
        angles = [rotation + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [radius] * 4
    elif shape == "triangle":
        angles = [rotation - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [radius] * 3
    elif shape == "star":
        angles = [rotation - math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [radius if k % 2 == 0 else radius * STAR_INNER_RATIO for k in range(10)]
    elif shape == "cross":
        # per arm (right, down, left, up): its two outer corners, then the inner corner after
        inner = radius * math.sin(_CROSS_CORNER) * math.sqrt(2)
        angles, radii = [], []
        for k in range(4):
            axis = rotation + k * math.pi / 2
            angles += [axis - _CROSS_CORNER, axis + _CROSS_CORNER, axis + math.pi / 4]
            radii += [radius, radius, inner]
    else:
        raise ValueError(f"no outline for {shape!r}")
    return [
        (cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii, strict=True)
    ]


def object_layout(
    obj: ShapeObject, rng: np.random.Generator | None = None
) -> tuple[float, float, float, float]:
    """(centre x, centre y, circumradius, rotation in radians), in fractions of the canvas side.

    Without ``rng`` the object sits exactly in its cell centre, unrotated, at its nominal size.
    """
    column, row = PLACE_CELLS[obj.place]
    cx, cy = (column + 0.5) / 3, (row + 0.5) / 3
    extent = SIZE_EXTENT[obj.size] * EXTENT_JITTER[1]
    rotation = 0.0
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        extent = SIZE_EXTENT[obj.size] * rng.uniform(*EXTENT_JITTER)
        rotation = math.radians(rng.uniform(-ROTATION_JITTER_DEGREES, ROTATION_JITTER_DEGREES))
    return cx, cy, extent * SHAPE_CIRCUMRADIUS[obj.shape], rotation


# Free layouts (sketches for ControlNets, `ldm dataset shapes --layout free`): each object off
# its cell's centre by up to this fraction of the side on each axis (grid scenes: 0.01), at 0.8
# to 1.25 times its size, turned up to 30 degrees, where no caption can say, so only a control
# map can place it.
FREE_SHIFT = 0.09
FREE_SCALES = (0.8, 1.25)
FREE_TURN_DEGREES = 30.0
LAYOUT_STREAM = 0x1A70


def free_layouts(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """`object_layout` tuples for each object of `scene` moved, resized and turned freely."""
    out = []
    for obj in scene.objects:
        cx, cy, radius, _ = object_layout(obj)
        out.append(
            (
                cx + rng.uniform(-FREE_SHIFT, FREE_SHIFT),
                cy + rng.uniform(-FREE_SHIFT, FREE_SHIFT),
                radius * rng.uniform(*FREE_SCALES),
                math.radians(rng.uniform(-FREE_TURN_DEGREES, FREE_TURN_DEGREES)),
            )
        )
    return out


def render(
    scene: Scene,
    size: int = 128,
    rng: np.random.Generator | None = None,
    layouts: list[tuple[float, float, float, float]] | None = None,
) -> Image.Image:
    """Draw at 4x and box-downsample, which anti-aliases the edges exactly by area coverage.

    ``rng`` adds the seeded position/size/rotation jitter used for training data; ``layouts``
    places each object as given instead (`object_layout`'s tuples).
    """
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for k, obj in enumerate(scene.objects):
        cx, cy, radius, rotation = layouts[k] if layouts else object_layout(obj, rng)
        cx, cy, radius = cx * big, cy * big, radius * big
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon(polygon_outline(obj.shape, cx, cy, radius, rotation), fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)
