"""Prompt grammar to conditioning on a tiny random checkpoint: long prompts, emphasis,
prompt editing per step, AND, and plain prompts exactly as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.pipeline.guidance import StepClock, cfg_denoiser
from ldm_cli.pipeline.request import Request
from ldm_cli.testing import random_checkpoint
from ldm_cli.text.batch import PromptBatch, ScheduledFeatures
from tests.cli_helpers import ldm, pixels, written

HIDDEN = TINY_SD1.text.hidden_size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=2)


@pytest.fixture(scope="module")
def pipe(tiny):
    return ldm_cli.load(tiny, device="cpu", dtype="fp32")


def request(prompt: str, negative: str = "", **options) -> Request:
    options = {"steps": 4, "sampler": "euler", "width": 64, "height": 64, **options}
    return Request(prompt, negative, **options)


def features(batch: PromptBatch, image: int = 0, part: int = 0, entry: int = 0) -> torch.Tensor:
    return batch.images[image][part][0].features[entry]


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)


def unet_contexts(pipe, run) -> list[torch.Tensor]:
    """The context of every U-Net call made by `run()`."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["context"].clone()), with_kwargs=True
    )
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("prompt", ["a red circle", words(75), ""])
def test_plain_prompts_give_exactly_the_features_of_encode_prompts(pipe, prompt):
    cond, uncond = pipe.conditioning([request(prompt, "blurry, dark")])
    assert torch.equal(features(cond), pipe.encode_prompts([prompt])[0])
    assert torch.equal(features(uncond), pipe.encode_prompts(["blurry, dark"])[0])


def test_a_150_token_prompt_gives_154_positions_of_two_encoded_chunks(pipe):
    cond, _ = pipe.conditioning([request(words(150))])
    long = features(cond)
    assert long.shape == (154, HIDDEN)
    one_chunk = pipe.encode_prompts([words(75)])[0]
    assert torch.equal(long[:77], one_chunk) and torch.equal(long[77:], one_chunk)


def test_the_negative_side_is_padded_with_empty_prompt_chunks(pipe):
    cond, uncond = pipe.conditioning([request(words(150), "blurry")])
    contexts = unet_contexts(pipe, lambda: pipe.generate(words(150), "blurry", steps=1))
    (context,) = contexts
    assert context.shape == (2, 154, HIDDEN)
    assert torch.equal(context[0, :77], features(uncond))
    assert torch.equal(context[0, 77:], pipe.encode_prompts([""])[0])
    assert torch.equal(context[1], features(cond))


def test_emphasis_scales_the_token_and_restores_the_mean(pipe):
    cond, _ = pipe.conditioning([request("a (red:1.5) circle")])
    weighted = features(cond)
    plain = pipe.encode_prompts(["a red circle"])[0]  # the same tokens, unweighted
    multipliers = torch.ones(77, 1)
    multipliers[2] = 1.5  # start, "a", "red"
    scaled = plain * multipliers
    assert torch.allclose(weighted, scaled * (plain.mean() / scaled.mean()), atol=1e-6)
    assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-7)
    assert not torch.allclose(weighted, plain)


def test_prompt_editing_switches_the_conditioning_at_the_step(pipe):
    cond, _ = pipe.conditioning([request("a [cat:dog:2] photo", steps=6)])
    schedule = cond.images[0][0][0]
    assert schedule.ends == (2, 6)
    cat, dog = pipe.encode_prompts(["a cat photo", "a dog photo"])
    assert [torch.equal(schedule.features[schedule.index_at(s)], cat) for s in range(6)] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert torch.equal(schedule.features[schedule.index_at(3)], dog)


@pytest.mark.parametrize(
    ("sampler", "steps_of_calls"),
    [
        ("euler", [0, 1, 2, 3]),
        ("dpmpp_2m", [0, 1, 2, 3]),
        # two evaluations per step use the step's conditioning; the last step (to sigma 0)
        # makes one
        ("heun", [0, 0, 1, 1, 2, 2, 3]),
        ("dpm2", [0, 0, 1, 1, 2, 2, 3]),
    ],
)
def test_every_model_call_gets_its_steps_conditioning(pipe, sampler, steps_of_calls):
    cat, dog = pipe.encode_prompts(["a cat", "a dog"])
    contexts = unet_contexts(
        pipe, lambda: pipe.generate("a [cat:dog:1]", steps=4, sampler=sampler, seed=0)
    )
    # "[cat:dog:1]" is cat up to step 1 (steps count from 0), then dog
    expected = [cat if step <= 1 else dog for step in steps_of_calls]
    assert len(contexts) == len(expected)
    for context, want in zip(contexts, expected, strict=True):
        assert torch.equal(context[1], want)


def test_alternation_changes_the_conditioning_every_step(pipe):
    cat, dog = pipe.encode_prompts(["a cat", "a dog"])
    contexts = unet_contexts(pipe, lambda: pipe.generate("a [cat|dog]", steps=5, seed=0))
    # A1111's lookup: steps 0 and 1 use entry 1, then one entry per step
    got = [
        "cat" if torch.equal(c[1], cat) else "dog" if torch.equal(c[1], dog) else "?"
        for c in contexts
    ]
    assert got == ["cat", "cat", "dog", "cat", "dog"]


def test_and_sub_prompts_share_one_unet_call_and_combine_as_a1111(pipe):
    contexts = unet_contexts(pipe, lambda: pipe.generate("a cat AND a dog:0.5", steps=2, seed=0))
    assert [c.shape[0] for c in contexts] == [3, 3]
    cat, dog, empty = pipe.encode_prompts(["a cat", " a dog", ""])

    def same(a, b):  # a batch of another size may take another BLAS kernel: last bits differ
        return torch.allclose(a, b, rtol=1e-5, atol=1e-5)

    assert all(same(c[0], empty) and same(c[1], cat) for c in contexts)
    assert all(same(c[2], dog) for c in contexts)


def test_and_combination_formula():
    def denoiser(x, sigma, context):  # x0 of each row: x plus its context's mean
        return x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    u, c1, c2, c3 = (torch.full((77, 4), v) for v in (0.0, 1.0, 2.0, 3.0))
    fixed = ScheduledFeatures.fixed
    cond = PromptBatch([[(fixed(c1), 1.0), (fixed(c2), 0.5)], [(fixed(c3), 0.25)]])
    uncond = PromptBatch([[(fixed(u), 1.0)], [(fixed(u), 1.0)]])
    calls = []
    model = cfg_denoiser(
        lambda x, s, context: calls.append(x.shape[0]) or denoiser(x, s, context),
        cond,
        uncond,
        7.0,
    )
    x = torch.zeros(2, 1, 1, 1)
    out = model(x, torch.tensor(1.0))
    assert calls == [6]  # uncond, sub-prompt 1 and sub-prompt 2 (weight 0 for image 2)
    assert out.flatten().tolist() == pytest.approx([7 * (1 + 0.5 * 2), 7 * 0.25 * 3])


def test_uneven_and_in_a_batch_keeps_blocks_of_images(pipe):
    reqs = [request("a red circle AND a cat", cfg=5.0), request("a blue square", seed=1, cfg=5.0)]
    cond, uncond = pipe.conditioning(reqs)
    assert cond.weights() == [[1.0, 1.0], [1.0, 0.0]]
    images = unet_contexts(pipe, lambda: list(pipe.render(reqs)))
    assert [c.shape[0] for c in images] == [6] * 4


def test_weighted_prompt_with_cfg_one_still_guides_from_the_negative(pipe):
    contexts = unet_contexts(pipe, lambda: pipe.generate("a cat:0.5", steps=2, cfg=1.0, seed=0))
    assert [c.shape[0] for c in contexts] == [2, 2]
    plain = unet_contexts(pipe, lambda: pipe.generate("a cat", steps=2, cfg=1.0, seed=0))
    assert [c.shape[0] for c in plain] == [1, 1]


def _previous_cfg_denoiser(denoiser, cond, uncond, scale, clock=None, **options):
    """The guidance closure as it was before prompt schedules and AND (for plain prompts)."""
    context = torch.cat([uncond, cond])

    def guided(x, sigma):
        s = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        x0_uncond, x0_cond = denoiser(torch.cat([x, x]), torch.cat([s, s]), context=context).chunk(
            2
        )
        return x0_uncond + (x0_cond - x0_uncond) * scale

    return guided


def _old_path_image(pipe, reqs: list[Request], monkeypatch) -> list[np.ndarray]:
    """Plain prompts rendered the way the pipeline did before the prompt grammar."""
    cond = pipe.encode_prompts([r.prompt for r in reqs])
    uncond = pipe.encode_prompts([r.negative_prompt for r in reqs])
    noises, gens = zip(*(pipe.initial_noise(r.seed, r.width, r.height) for r in reqs), strict=True)
    with monkeypatch.context() as patch:
        patch.setattr("ldm_cli.pipeline.base.cfg_denoiser", _previous_cfg_denoiser)
        latents = pipe.sample(cond, uncond, torch.cat(noises), list(gens), reqs[0])
    return [np.asarray(image) for image in pipe.decode(latents)]


@pytest.mark.parametrize("sampler", ["euler_a", "heun"])
def test_plain_prompts_render_bit_identically_to_before(pipe, sampler, monkeypatch):
    reqs = [
        request("a red circle", "blurry", sampler=sampler, steps=3, seed=4),
        request("a blue square", "", sampler=sampler, steps=3, seed=5),
    ]
    new = [np.asarray(image) for _, image in pipe.render(reqs)]
    old = _old_path_image(pipe, reqs, monkeypatch)
    assert all(np.array_equal(a, b) for a, b in zip(new, old, strict=True))


def test_ldm_generate_plain_prompt_is_bit_identical_and_grammar_is_kept_verbatim(
    pipe, tiny, tmp_path, monkeypatch
):
    common = ["--steps", "3", "--seed", "9", "--sampler", "euler", "--model", str(tiny)]
    common += ["--out", str(tmp_path)]
    (plain,) = written(ldm("generate", "a red circle", "-n", "blurry", *common))
    reference = [request("a red circle", "blurry", steps=3, seed=9)]
    old = _old_path_image(pipe, reference, monkeypatch)[0]
    assert np.array_equal(pixels(plain), old)
    prompt = "a [red:blue:0.5] (circle:1.2) AND a square:0.4 BREAK [big|small]"
    (styled,) = written(ldm("generate", prompt, *common))
    assert parse_parameters(read_parameters(styled)).prompt == prompt
    assert not np.array_equal(pixels(styled), pixels(plain))


def test_bad_emphasis_weight_is_a_one_line_error(pipe, tiny, tmp_path):
    with pytest.raises(UserError, match="emphasis weight"):
        pipe.generate("a (cat:1.2.3)", steps=1)
    proc = ldm(
        "generate", "a (cat:1.2.3)", "--model", str(tiny), "--out", str(tmp_path), check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: emphasis weight '1.2.3' in the prompt is not a number"
    ]


def test_the_guidance_clock_is_per_run():
    clock = StepClock()
    clock.finished(0)
    clock.finished(1)
    assert clock.step == 2
