"""NaN/inf detection, and the fp32 retry of an fp16 VAE decode that overflows."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.core.numerics import check_latents, decode_finite
from ldm_cli.pipeline.load import load
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, pixels, written

# post_quant_conv scaled by this: its weights stay below fp16's largest value (65504) but the
# decoder's activations pass it, while fp32 decodes fine (the group norms undo the scale)
VAE_GAIN = 1e4
UNET_GAIN = 1e6  # the U-Net's last convolution: its output overflows fp16


def _patched(source, target, gains: dict[str, float]):
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    state = load_file(source)
    for key, gain in gains.items():
        state[key] = state[key] * gain
    save_file(state, target, metadata=metadata)
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("numerics")
    tiny = random_checkpoint(TINY_SD1, d / "tiny.safetensors", seed=7)
    vae = "first_stage_model.post_quant_conv."
    unet = "model.diffusion_model.out.2."
    return {
        "tiny": tiny,
        "hot-vae": _patched(
            tiny, d / "hot-vae.safetensors", {vae + "weight": VAE_GAIN, vae + "bias": VAE_GAIN}
        ),
        "hot-unet": _patched(
            tiny, d / "hot-unet.safetensors", {unet + "weight": UNET_GAIN, unet + "bias": UNET_GAIN}
        ),
        "broken-vae": _patched(
            tiny, d / "broken-vae.safetensors", {"first_stage_model.decoder.conv_out.bias": np.inf}
        ),
    }


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_check_latents():
    check_latents(_latents())
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = _latents()
        x[1, 2, 3, 4] = bad
        with pytest.raises(UserError, match="latents hold NaN/inf") as err:
            check_latents(x, torch.float16)
        assert "--dtype fp32" in str(err.value) and err.value.exit_code == 1
        with pytest.raises(UserError) as err:
            check_latents(x, torch.float32)
        assert "--dtype fp32" not in str(err.value)


def test_fp16_vae_overflow_is_retried_in_fp32(models):
    pipe = load(models["hot-vae"], device="cpu", dtype="fp32")
    latents = _latents()
    with torch.inference_mode():
        reference = decode_finite(pipe.vae, latents, pipe.config.vae.scale_factor)
    pipe.vae.half()
    with torch.inference_mode():  # the premise: this VAE overflows in fp16
        raw = pipe.vae.decode(latents.half() / pipe.config.vae.scale_factor)
    assert not torch.isfinite(raw).all()
    # the fp32 retry decodes with the fp16 weights made fp32: compare with those
    expected_vae = load(models["hot-vae"], device="cpu", dtype="fp32").vae.half().float()
    with torch.inference_mode():
        expected = expected_vae.decode(latents / pipe.config.vae.scale_factor).float()
    warnings = []
    images = decode_finite(pipe.vae, latents, pipe.config.vae.scale_factor, warn=warnings.append)
    assert len(warnings) == 1 and "fp16 VAE" in warnings[0] and "fp32" in warnings[0]
    assert next(pipe.vae.parameters()).dtype == torch.float32  # it stays fp32 for the run
    assert torch.isfinite(images).all()
    assert torch.equal(images, expected)
    assert (images - reference).abs().max() < 0.05  # fp16 weights, but the same decoder
    again = decode_finite(pipe.vae, latents, pipe.config.vae.scale_factor, warn=warnings.append)
    assert len(warnings) == 1 and torch.equal(again, images)


def test_vae_that_fails_in_fp32_too(models):
    pipe = load(models["broken-vae"], device="cpu", dtype="fp32")
    with pytest.raises(UserError, match=r"decoded image holds NaN/inf .*VAE\)"):
        decode_finite(pipe.vae, _latents(), pipe.config.vae.scale_factor)
    pipe.vae.half()
    warnings = []
    with pytest.raises(UserError, match="in fp32 too"):
        decode_finite(pipe.vae, _latents(), pipe.config.vae.scale_factor, warn=warnings.append)
    assert len(warnings) == 1


def test_cli_fp16_vae_overflow_warns_and_writes_the_fp32_image(models, tmp_path):
    common = ["a cat", "--steps", "2", "--seed", "3", "--device", "cpu", "--dtype", "fp16"]
    proc = ldm(
        "generate", *common, "--model", str(models["hot-vae"]), "-o", str(tmp_path), "-N", "2"
    )
    paths = written(proc)
    assert len(paths) == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the fp16 VAE"), proc.stderr
    for path in paths:
        assert np.isfinite(pixels(path)).all() and pixels(path).std() > 0


def test_cli_fp16_unet_overflow_is_one_line(models, tmp_path):
    out = tmp_path / "out"
    proc = ldm(
        "generate",
        "a cat",
        "--steps",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--dtype",
        "fp16",
        "--model",
        str(models["hot-unet"]),
        "-o",
        str(out),
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "latents hold NaN/inf" in lines[0] and "--dtype fp32" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not os.listdir(out)
