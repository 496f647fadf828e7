"""Whole FLUX.1 and SD 3.5 images against diffusers' pipelines built from the same weights.

One all-in-one file per tiny model (`random_flow_checkpoint`) is loaded by `ldm_cli.load` and,
part by part, into diffusers' FluxPipeline / StableDiffusion3Pipeline (tests.flow_helpers); both
run Euler flow matching (FlowMatchEulerDiscreteScheduler: FLUX dev's own config with its dynamic
shift, schnell unshifted, SD3 shift 3) for 4 steps at 64x64 from the same CPU generator per
image, and the decoded pixels must agree to 2/255.

The reference is built from the configuration ours reads back from the file, not from the
TINY_* config that wrote it: the file holds no metadata, and shapes cannot tell a CLIP's head
count (detection assumes 64-wide heads, real CLIPs' width) or CLIP-G's activation (gelu), where
TINY_* have 16-wide heads and a quick_gelu CLIP-G. Everything shapes do fix is checked equal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_cli
from ldm_cli.testing import (
    TINY_FLUX_DEV,
    TINY_FLUX_SCHNELL,
    TINY_SD35,
    random_flow_checkpoint,
    split_flow_checkpoint,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from tests.flow_helpers import (  # noqa: E402
    TEXT_PREFIXES,
    TRANSFORMER_PREFIX,
    VAE_PREFIX,
    flow_tokenizers,
    flux_reference,
    part_state,
    reference_clip,
    reference_t5,
    sd3_from_single_file,
    vae_reference,
)

TOLERANCE = 2.0  # in steps of 1/255
SLACK = 1e-6  # float64 rounding of k/255 - j/255 against k - j
SEED = 11
STEPS = 4
SIZE = 64
PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality, watermark"
MODELS = {"flux-dev": TINY_FLUX_DEV, "flux-schnell": TINY_FLUX_SCHNELL, "sd35": TINY_SD35}
# each model's settings, as ours and diffusers' pipelines take them
OURS = {
    "flux-dev": {"cfg": 1.0, "guidance": 3.5},
    "flux-schnell": {"cfg": 1.0},
    "sd35": {"cfg": 4.5},
}
THEIRS = {
    "flux-dev": {"guidance_scale": 3.5},
    "flux-schnell": {},
    "sd35": {"guidance_scale": 4.5},
}
NEGATIVES = {"flux-dev": "", "flux-schnell": "", "sd35": NEGATIVE}


@dataclass
class Pair:
    """One model's file, our pipeline of it and diffusers' pipeline of the same weights."""

    name: str
    path: Path
    ours: object
    theirs: object

    def generate(self, seed: int = SEED, images: int = 1) -> list[Image.Image]:
        return self.ours.generate(
            PROMPT,
            NEGATIVES[self.name],
            seed=seed,
            steps=STEPS,
            width=SIZE,
            height=SIZE,
            sampler="euler",
            num_images=images,
            batch_size=images,
            **OURS[self.name],
        )

    def reference(self, seeds: list[int]) -> np.ndarray:
        extra = dict(THEIRS[self.name])
        if NEGATIVES[self.name]:
            extra["negative_prompt"] = NEGATIVES[self.name]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return self.theirs(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            num_images_per_prompt=len(seeds),
            generator=generators if len(seeds) > 1 else generators[0],
            max_sequence_length=self.ours.config.t5_tokens,
            output_type="np",
            **extra,
        ).images


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def reference(reference_dir):
    return reference_dir, flow_tokenizers(reference_dir)


@pytest.fixture(scope="module")
def pairs(reference, tmp_path_factory):
    """`pairs(name)`: the model's Pair, built once per module."""
    built: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            built[name] = build_pair(name, folder, *reference)
        return built[name]

    return get


def build_pair(name: str, folder: Path, reference_dir: str, tokenizers) -> Pair:
    path = random_flow_checkpoint(MODELS[name], folder / f"{name}.safetensors", seed=0)
    ours = ldm_cli.load(path, device="cpu")
    cfg, tiny = ours.config, MODELS[name]
    # what the shapes fix reads back as written (module docstring)
    assert (cfg.transformer, cfg.vae, cfg.t5) == (tiny.transformer, tiny.vae, tiny.t5)
    assert cfg.family == tiny.family and cfg.shift == tiny.shift
    assert cfg.dynamic_shift == tiny.dynamic_shift

    state = load_file(str(path))
    vae = vae_reference(cfg.vae, part_state(state, VAE_PREFIX), folder)
    clip_l = reference_clip(cfg.clip_l, part_state(state, TEXT_PREFIXES["clip_l"]))
    t5 = reference_t5(cfg.t5, part_state(state, TEXT_PREFIXES["t5"]))
    scheduler = flow_scheduler(name, reference_dir)
    if cfg.is_flux:
        theirs = diffusers.FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=clip_l,
            tokenizer=tokenizers.clip,
            text_encoder_2=t5,
            tokenizer_2=tokenizers.t5,
            transformer=flux_reference(cfg.transformer, part_state(state, TRANSFORMER_PREFIX)),
        )
    else:
        theirs = diffusers.StableDiffusion3Pipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=clip_l,
            tokenizer=tokenizers.clip,
            text_encoder_2=reference_clip(cfg.clip_g, part_state(state, TEXT_PREFIXES["clip_g"])),
            tokenizer_2=tokenizers.clip_g,
            text_encoder_3=t5,
            tokenizer_3=tokenizers.t5,
            # diffusers' own single-file conversion, reading the all-in-one file itself
            transformer=sd3_from_single_file(cfg.transformer, path, folder),
        )
    # diffusers sizes the latents by 2 ** (levels - 1) of the VAE: the tiny one's factor 2
    assert theirs.vae_scale_factor == ours.latent_factor == 2
    theirs.set_progress_bar_config(disable=True)
    return Pair(name, path, ours, theirs)


def flow_scheduler(name: str, reference_dir: str):
    """FLUX dev's own scheduler config (dynamic shift); schnell's and SD3's as released."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler
    if name == "flux-dev":
        config = Path(reference_dir, "flux-dev-d1", "scheduler")
        if not config.is_dir():
            pytest.skip(f"{config} not present")
        loaded = scheduler.from_pretrained(config.parent, subfolder="scheduler")
        assert loaded.config.use_dynamic_shifting
        return loaded
    if name == "flux-schnell":
        return scheduler(shift=1.0, use_dynamic_shifting=False)
    return scheduler(shift=3.0)


def pixels(images: list[Image.Image]) -> np.ndarray:
    """[N, H, W, 3] in [0, 1], as diffusers' output_type="np"."""
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) / 255 for image in images])


def max_difference(name: str, ours: np.ndarray, theirs: np.ndarray) -> float:
    """The largest difference of two [N, H, W, 3] images in [0, 1], in steps of 1/255 (less
    SLACK, so that a difference of exactly k steps meets a tolerance of k)."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert theirs.std() > 0.05  # an image, not a flat field: the comparison means something
    diff = float(np.abs(ours - theirs).max()) * 255
    print(f"{name}: max pixel difference {diff:.3f}/255")
    return diff - SLACK


@pytest.mark.parametrize("name", list(MODELS))
def test_text_to_image_matches_diffusers(pairs, name):
    pair = pairs(name)
    start = time.perf_counter()
    ours = pixels(pair.generate())
    theirs = pair.reference([SEED])
    print(f"{name}: both runs {time.perf_counter() - start:.2f} s")
    assert max_difference(name, ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_of_two_seeds_matches_diffusers(pairs, name):
    """Ours: num_images=2 in one batch (seeds s, s + 1); diffusers: a generator per image."""
    pair = pairs(name)
    ours = pixels(pair.generate(SEED, images=2))
    theirs = pair.reference([SEED, SEED + 1])
    assert np.abs(theirs[0] - theirs[1]).mean() > 0.05  # two different images
    assert max_difference(f"{name} batch", ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("name", ["flux-dev", "sd35"])
def test_split_files_give_the_same_pixels(pairs, name, tmp_path):
    """The bare transformer with --vae, --clip-l (--clip-g) and --t5 files, as FLUX ships:
    bitwise the same weights, so the same pixels. Not bitwise the same pixels: the weights stay
    memory-mapped at their offsets in the file, and the CPU's matmul kernels sum in another
    order for another alignment (FLUX dev's velocity moves by 2e-6, one pixel by 1/255)."""
    pair = pairs(name)
    files = split_flow_checkpoint(pair.path, tmp_path)
    parts = {part: files[part] for part in ("vae", "clip_l", "clip_g", "t5") if part in files}
    assert set(parts) == ({"vae", "clip_l", "t5"} | ({"clip_g"} if name == "sd35" else set()))
    split = ldm_cli.load(files["model"], device="cpu", **parts)
    assert split.config == pair.ours.config
    weights, expected = split.model.state_dict(), pair.ours.model.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    images = split.generate(
        PROMPT,
        NEGATIVES[name],
        seed=SEED,
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        sampler="euler",
        **OURS[name],
    )
    assert max_difference(f"{name} split", pixels(images), pixels(pair.generate())) <= 1


# -- FLUX img2img ------------------------------------------------------------------------------


def card_image() -> Image.Image:
    """A smooth 64x64 RGB test card."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def img2img_difference(pair: Pair, strength: float) -> float:
    image = card_image()
    ours = pair.ours.img2img(
        image, PROMPT, strength=strength, seed=SEED, steps=STEPS, sampler="euler", **OURS[pair.name]
    )
    theirs = diffusers.FluxImg2ImgPipeline(**pair.theirs.components)
    theirs.set_progress_bar_config(disable=True)
    reference = theirs(
        PROMPT,
        image=image,
        strength=strength,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(SEED),
        max_sequence_length=pair.ours.config.t5_tokens,
        output_type="np",
        **THEIRS[pair.name],
    ).images
    return max_difference(f"{pair.name} img2img {strength}", pixels(ours), reference)


def test_flux_img2img_matches_diffusers(pairs):
    """Both draw the VAE posterior's sample first from the image's generator, then the noise
    (diffusers' retrieve_latents(sample_mode="sample"), then prepare_latents' randn): at 0.75
    both skip 1 of 4 steps. The tiny VAE's posterior std reaches 0.2-5.8, so drawing the mode
    or the noise first would change the image entirely."""
    assert img2img_difference(pairs("flux-dev"), 0.75) <= TOLERANCE


def test_flux_img2img_at_strength_06_matches_diffusers(pairs):
    """Flow models round the strength as diffusers' flow pipelines do: 4 steps at 0.6 skip
    int(4 - 2.4) = 1 and run 3 (its SD pipelines, and ours for SD, run int(4 * 0.6) = 2)."""
    assert img2img_difference(pairs("flux-dev"), 0.6) <= TOLERANCE
