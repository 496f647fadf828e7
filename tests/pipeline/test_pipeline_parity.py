"""Whole-pipeline parity: `ldm` and diffusers' StableDiffusionPipeline, loaded from the same
single-file checkpoint (seeded random weights), give the same image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_cli.core.config import TINY_SD1
from ldm_cli.pipeline.load import load
from ldm_cli.testing import random_checkpoint
from tests.reference_configs import (
    diffusers_unet_config,
    diffusers_vae_config,
    transformers_clip_config,
)

diffusers = pytest.importorskip("diffusers")

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, ugly"
SEED = 1234
SIZE = 64


def write_config_dir(root: Path, reference_dir: str, cfg=TINY_SD1) -> Path:
    """The diffusers folder layout `from_single_file(config=...)` reads for `cfg` (SD 1.x)."""
    folders = {
        "unet": {"_class_name": "UNet2DConditionModel", **diffusers_unet_config(cfg.unet)},
        "vae": {"_class_name": "AutoencoderKL", **diffusers_vae_config(cfg.vae)},
        "text_encoder": transformers_clip_config(cfg.text),
    }
    for name, config in folders.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    ref = Path(reference_dir) / "sd15"
    shutil.copytree(ref / "tokenizer", root / "tokenizer")
    shutil.copytree(ref / "scheduler", root / "scheduler")
    index = json.loads((ref / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None])
    index["requires_safety_checker"] = False
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors"
    return random_checkpoint(TINY_SD1, path, seed=11)


@pytest.fixture(scope="module")
def reference_pipe(checkpoint, tmp_path_factory, reference_dir):
    from diffusers import StableDiffusionPipeline

    config_dir = write_config_dir(tmp_path_factory.mktemp("config"), reference_dir)
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint),
        config=str(config_dir),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load(checkpoint, device="cpu", dtype="fp32")


def reference_image(pipe, scheduler_cls, **scheduler_kwargs) -> np.ndarray:
    pipe.scheduler = scheduler_cls.from_config(pipe.original_scheduler_config, **scheduler_kwargs)
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=10,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def our_image(pipe, sampler: str, scheduler: str = "auto") -> np.ndarray:
    (image,) = pipe.generate(
        PROMPT,
        NEGATIVE,
        steps=10,
        cfg=7.5,
        seed=SEED,
        sampler=sampler,
        scheduler=scheduler,
        width=SIZE,
        height=SIZE,
    )
    return np.asarray(image)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()} (mean {diff.mean():.4f})"
    # the images must not be trivially flat, or the comparison would prove nothing
    assert a.std() > 5


@pytest.mark.parametrize(
    "sampler, scheduler, reference",
    [
        ("euler", "normal", ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"})),
        ("ddim", "auto", ("DDIMScheduler", {"timestep_spacing": "leading"})),
        (
            "euler_a",
            "normal",
            ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
        ),
    ],
)
def test_generate_matches_diffusers(ours, reference_pipe, sampler, scheduler, reference):
    cls_name, kwargs = reference
    expected = reference_image(reference_pipe, getattr(diffusers, cls_name), **kwargs)
    assert_same_image(our_image(ours, sampler, scheduler), expected)


def test_components_share_weights_with_reference(ours, reference_pipe):
    """The reference pipeline really converted our file (not e.g. random init)."""
    ref = reference_pipe.unet.conv_in.weight
    assert torch.equal(ours.unet.input_blocks[0][0].weight, ref)
    tokens = ours.tokenizer([PROMPT])
    ref_tokens = reference_pipe.tokenizer(
        [PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(tokens, ref_tokens)
