"""`ldm train --config <x4 upscaler>`: a tiny run on generated shapes around a base model's
frozen f=4 VAE and text encoder; the loss falls and the export is an upscaler `ldm_cli.load`
opens."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from ldm_cli.cli import app
from ldm_cli.core.config import TINY_SD1, TINY_X4
from ldm_cli.core.errors import UserError
from ldm_cli.testing import random_checkpoint
from ldm_cli.training.embedded_config import EMBEDDED, EMBEDDED_X4, training_config
from ldm_cli.training.upscaler_run import upscaler_config
from tests.image_helpers import photo

# TINY_SD1 with an f=4 VAE (three levels), standing in for the embedded model.
BASE = TINY_SD1.with_(vae=replace(TINY_SD1.vae, ch_mult=(1, 2, 2), scale_factor=0.5))
STEPS = 60


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("x4-train")
    data = root / "shapes"
    invoke("dataset", "shapes", str(data), "--num", "64", "--size", "64")
    base = random_checkpoint(BASE, root / "base.safetensors", seed=4)
    out = root / "run"
    invoke(
        "train",
        str(data),
        "--config",
        "tiny-x4",
        "--base",
        str(base),
        "--out",
        str(out),
        "--unet-steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--log-every",
        "5",
        "--holdout",
        "4",
        "--threads",
        "1",
    )
    return out


@pytest.mark.slow
def test_loss_falls_and_the_export_upscales(run):
    lines = (run / "train_log.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if r["stage"] == "upscaler"]
    assert len(losses) == STEPS // 5
    print("upscaler losses:", losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3

    metrics = json.loads((run / "metrics.json").read_text())
    evaluation = metrics["upscaler_eval"]
    assert evaluation["images"] == 4
    assert evaluation["psnr_db"] > 0 and evaluation["bicubic_psnr_db"] > 10
    assert evaluation["psnr_no_prompt_db"] > 0 and evaluation["cfg"] == TINY_X4.default_cfg
    assert (run / "samples" / f"upscaler_{STEPS:06d}.png").is_file()

    from ldm_cli import load

    pipe = load(run / "model.safetensors", device="cpu", dtype="fp32")
    assert pipe.is_upscaler and pipe.config.family == "x4-upscaler"
    assert pipe.config.vae == BASE.vae  # the base's VAE, scale factor included
    assert pipe.config.unet == replace(TINY_X4.unet, context_dim=BASE.text.hidden_size)
    (image,) = pipe.upscale(photo("coffee", 16), steps=2, seed=0)
    assert image.size == (64, 64)
    base_vae = load(run.parent / "base.safetensors", dtype="fp32").vae.state_dict()
    for key, value in pipe.vae.state_dict().items():
        assert torch.equal(value, base_vae[key]), key  # frozen


def test_embedded_x4_config_follows_the_embedded_model():
    assert training_config("embedded-x4") is EMBEDDED_X4
    cfg = upscaler_config(EMBEDDED_X4, EMBEDDED)
    assert cfg.family == "x4-upscaler" and cfg.prediction == "v"
    assert cfg.unet.in_channels == EMBEDDED.vae.embed_dim + 3
    assert cfg.unet.context_dim == EMBEDDED.text.hidden_size
    assert cfg.vae == EMBEDDED.vae and cfg.vae.downscale == 4
    with pytest.raises(UserError, match="needs an f=4 VAE"):
        upscaler_config(EMBEDDED_X4, TINY_SD1)
