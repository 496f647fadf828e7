"""SDXL prompts through the A1111 prompt path (ldm_cli.pipeline.conditioning) on tiny random
checkpoints: long prompts (chunks of both towers concatenated along the sequence), emphasis
on the text features only, ``y`` from the first chunk's pooled output at every position,
prompt editing, AND, BREAK, textual inversion, the refiner, and plain prompts unchanged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import ldm_cli
from ldm_cli.core.config import TINY_SDXL, TINY_SDXL_REFINER
from ldm_cli.pipeline.request import Request
from ldm_cli.pipeline.tasks.refiner import attach_refiner
from ldm_cli.testing import random_checkpoint
from ldm_cli.text.batch import GuidanceContext, PromptBatch

TEXT = TINY_SDXL.unet.context_dim  # CLIP-L + bigG features (2048 for the real model)
ADM = TINY_SDXL.unet.adm_in_channels
REFINER_TEXT = TINY_SDXL_REFINER.unet.context_dim


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-prompts")
    path = random_checkpoint(TINY_SDXL, root / "xl.safetensors", seed=6)
    return ldm_cli.load(path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-prompts-refiner")
    path = random_checkpoint(TINY_SDXL_REFINER, root / "refiner.safetensors", seed=7)
    return ldm_cli.load(path, device="cpu", dtype="fp32")


def request(prompt: str, negative: str = "", **options) -> Request:
    options = {"steps": 4, "sampler": "euler", "width": 64, "height": 64, **options}
    return Request(prompt, negative, **options)


def features(batch: PromptBatch, image: int = 0, part: int = 0, entry: int = 0) -> torch.Tensor:
    return batch.images[image][part][0].features[entry]


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)


def text_and_y(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows [L, TEXT + ADM] -> (text features, y), checking y is the same everywhere."""
    y = rows[:, TEXT:]
    assert y.shape[-1] == ADM
    assert torch.equal(y, y[:1].expand_as(y)), "y differs between token positions"
    return rows[:, :TEXT], y[0]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding: rows encoded in batches of different sizes may take
    different BLAS kernels (a pooled row alone is a matrix-vector product), so the last
    bits can differ between two calls that compute the same thing."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def packed(pipe, prompt: str, negative: bool = False) -> torch.Tensor:
    """The rows of the plain (pre-syntax) SDXL path: one 77-token row, the prompt as text."""
    return pipe.packed_conditioning([prompt], 64, 64, negative)[0]


@pytest.mark.parametrize("prompt", ["a red square", words(75), ""])
def test_plain_prompts_are_unchanged_bit_for_bit(pipe, prompt):
    req = request(prompt, "blurry, dark", cfg=5.0, seed=3)
    cond, uncond = pipe.conditioning([req])
    assert torch.equal(features(cond), packed(pipe, prompt))
    assert torch.equal(features(uncond), packed(pipe, "blurry, dark", negative=True))
    noise, gen = pipe.initial_noise(req.seed, req.width, req.height)
    got = pipe.sample(cond, uncond, noise, [gen], req)
    old_cond, old_uncond = packed(pipe, prompt)[None], packed(pipe, "blurry, dark", True)[None]
    noise, gen = pipe.initial_noise(req.seed, req.width, req.height)
    expected = pipe.sample(old_cond, old_uncond, noise, [gen], req)
    assert torch.equal(got, expected)


def test_a_150_token_prompt_gives_154_positions_and_the_first_chunks_y(pipe):
    cond, _ = pipe.conditioning([request(f"{words(75)} {words(75, 'dog')}")])
    rows = features(cond)
    assert rows.shape == (154, TEXT + ADM)
    text, y = text_and_y(rows)
    cats, dogs = packed(pipe, words(75)), packed(pipe, words(75, "dog"))
    assert same(text[:77], cats[:, :TEXT]) and same(text[77:], dogs[:, :TEXT])
    assert same(y, cats[0, TEXT:])  # the pooled output of the first chunk, as A1111
    assert not torch.equal(y, dogs[0, TEXT:])


def test_break_starts_a_new_chunk(pipe):
    cond, _ = pipe.conditioning([request("a red square BREAK blue")])
    text, y = text_and_y(features(cond))
    assert text.shape[0] == 154
    assert same(text[:77], packed(pipe, "a red square")[:, :TEXT])
    assert same(text[77:], packed(pipe, "blue")[:, :TEXT])
    assert same(y, packed(pipe, "a red square")[0, TEXT:])


def test_emphasis_changes_the_text_features_but_never_y(pipe):
    cond, _ = pipe.conditioning([request("a (red:1.5) square")])
    text, y = text_and_y(features(cond))
    plain = packed(pipe, "a red square")
    plain_text = plain[:, :TEXT]
    multipliers = torch.ones(77, 1)
    multipliers[2] = 1.5  # start, "a", "red"
    scaled = plain_text * multipliers
    assert torch.allclose(text, scaled * (plain_text.mean() / scaled.mean()), atol=1e-6)
    assert torch.allclose(text.mean(), plain_text.mean(), atol=1e-7)  # the mean restored
    assert not torch.allclose(text, plain_text)
    assert same(y, plain[0, TEXT:])
    weaker, _ = pipe.conditioning([request("a [red] square, (((square)))")])
    _, weaker_y = text_and_y(features(weaker))
    assert same(weaker_y, packed(pipe, "a red square, square")[0, TEXT:])


def test_prompt_editing_switches_the_conditioning_at_half_the_steps(pipe):
    steps = 6
    req = request("a [cat:dog:0.5] photo", "blurry", steps=steps, cfg=5.0)
    cond, uncond = pipe.conditioning([req])
    schedule = cond.images[0][0][0]
    assert schedule.ends == (3, steps)
    cat, dog = packed(pipe, "a cat photo"), packed(pipe, "a dog photo")
    assert same(schedule.features[0], cat) and same(schedule.features[1], dog)
    assert not torch.equal(cat[0, TEXT:], dog[0, TEXT:])  # y follows the text too
    # what the U-Net sees at each sampler step (euler: one call per step)
    seen = []
    handle = pipe.model.unet.register_forward_pre_hook(
        lambda module, args: seen.append((args[2].clone(), args[3].clone()))
    )
    try:
        noise, gen = pipe.initial_noise(req.seed, req.width, req.height)
        pipe.sample(cond, uncond, noise, [gen], req)
    finally:
        handle.remove()
    assert len(seen) == steps
    expected = [cat if schedule.index_at(step) == 0 else dog for step in range(steps)]
    for (context, y), rows in zip(seen, expected, strict=True):  # row 1: the prompt
        assert same(context[1], rows[:, :TEXT]) and same(y[1], rows[0, TEXT:])
    # A1111's schedule [[3, cat], [6, dog]]: "cat" while the (0-based) step is <= 3
    assert [same(y[1], cat[0, TEXT:]) for _, y in seen] == [True] * 4 + [False] * 2
    negative = packed(pipe, "blurry", negative=True)
    assert all(same(y[0], negative[0, TEXT:]) for _, y in seen)


def test_and_gives_each_part_its_own_y(pipe):
    cond, uncond = pipe.conditioning([request("a cat AND a dog :0.5", "blurry")])
    (cat, w1), (dog, w2) = cond.images[0]
    assert (w1, w2) == (1.0, 0.5)
    assert same(cat.features[0], packed(pipe, "a cat"))
    assert same(dog.features[0], packed(pipe, "a dog"))


def test_the_short_side_is_padded_with_empty_text_and_keeps_its_y(pipe):
    long = words(150)
    cond, uncond = pipe.conditioning([request(long, "blurry", cfg=5.0)])
    context = GuidanceContext(cond, uncond).at(0)
    assert context.shape == (2, 154, TEXT + ADM)
    negative_text, negative_y = text_and_y(context[0])
    blurry, empty = packed(pipe, "blurry", negative=True), packed(pipe, "")
    assert same(negative_text[:77], blurry[:, :TEXT])
    assert same(negative_text[77:], empty[:, :TEXT])
    assert same(negative_y, blurry[0, TEXT:])
    assert same(context[1], features(cond))
    (image,) = pipe.generate(long, "blurry", steps=1, seed=1, width=64, height=64)
    assert image.size == (64, 64)


def test_textual_inversion_in_a_long_prompt(pipe, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    g = torch.Generator().manual_seed(5)
    vectors = {
        "clip_l": torch.randn(2, TINY_SDXL.text.hidden_size, generator=g),
        "clip_g": torch.randn(2, TINY_SDXL.text2.hidden_size, generator=g),
    }
    save_file(vectors, str(folder / "xlstyle.safetensors"))
    plain_rows = packed(pipe, "a xlstyle cat")
    pipe.networks.load_embeddings(folder)
    try:
        with_embedding = packed(pipe, "a xlstyle cat")
        assert not torch.equal(with_embedding, plain_rows)
        cond, _ = pipe.conditioning([request("a (xlstyle:1.0) cat BREAK dog")])
        text, y = text_and_y(features(cond))
        assert text.shape[0] == 154
        assert same(text[:77], with_embedding[:, :TEXT])
        assert same(y, with_embedding[0, TEXT:])
    finally:
        pipe.networks.embeddings = None


def test_refiner_rows_follow_the_prompt_path(pipe, refiner):
    attach_refiner(pipe, refiner, 0.5)
    try:
        cond, uncond = pipe.conditioning([request("a red square", "blurry", cfg=5.0)])
        assert same(features(cond), pipe.packed_conditioning(["a red square"], 64, 64)[0])
        req = request(f"a (red:1.2) square, {words(80)}", "blurry", cfg=5.0)
        cond, uncond = pipe.conditioning([req])
        rows = features(cond)
        assert rows.shape[0] == 154
        own = pipe.schedules([req.prompt], req.steps, 64, 64, False)[req.prompt].features[0]
        theirs = refiner.scheduled_conditioning([req.prompt], req.steps, 64, 64)[req.prompt]
        theirs = theirs.features[0]
        split = TEXT + REFINER_TEXT
        assert same(rows[:, :TEXT], own[:, :TEXT])
        assert same(rows[:, TEXT:split], theirs[:, :REFINER_TEXT])
        assert same(rows[:, split : split + ADM], own[:, TEXT:])
        assert same(rows[:, split + ADM :], theirs[:, REFINER_TEXT:])
        (image,) = pipe.generate(req.prompt, "blurry", steps=2, seed=1, width=64, height=64)
        assert image.size == (64, 64)
    finally:
        pipe.refiner = None


def test_refiner_alone_takes_the_syntax(refiner):
    cond, _ = refiner.conditioning([request("a (red:1.3) square")])
    rows = features(cond)
    plain = refiner.packed_conditioning(["a red square"], 64, 64)[0]
    width = TINY_SDXL_REFINER.unet.context_dim
    assert same(rows[:, width:], plain[:, width:])  # the aesthetic-score y unchanged
    assert not torch.equal(rows[:, :width], plain[:, :width])
