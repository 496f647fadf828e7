"""`ldm train --base CKPT` with a text-to-image config: fine-tuning, grown U-Nets included."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ldm_cli.checkpoints.detect import config_to_json
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.data.shapes_writer import write_shapes_dataset
from ldm_cli.models.unet import UNetModel
from ldm_cli.testing import random_checkpoint
from ldm_cli.training.fine_tune import start_from
from ldm_cli.training.unet_stage import zero_init_like_ldm
from tests.training.test_training import stage_losses, training_app

SIZE = 32
BASE = TINY_SD1.with_(
    unet=replace(
        TINY_SD1.unet, model_channels=32, attention_resolutions=(2,), transformer_depth=(0, 1)
    ),
    default_size=SIZE,
)
# The base with cross-attention added at the full-resolution level.
GROWN = BASE.with_(unet=replace(BASE.unet, attention_resolutions=(2, 1), transformer_depth=(1, 1)))


def _unet(cfg, seed: int) -> UNetModel:
    torch.manual_seed(seed)
    unet = UNetModel(cfg.unet)
    with torch.no_grad():  # no zero layers: every block of the base does something
        for param in unet.parameters():
            param.normal_(0, 0.05)
    return unet.eval()


def _call(unet: UNetModel, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, BASE.unet.context_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), context=context)


def test_a_grown_unet_starts_as_exactly_its_base():
    base = _unet(BASE, seed=1)
    grown = zero_init_like_ldm(UNetModel(GROWN.unet)).eval()
    added = start_from(grown, base)
    assert added == ["input_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1"]
    assert torch.equal(_call(grown), _call(base))
    for key, value in base.state_dict().items():
        assert torch.equal(grown.state_dict()[key], value), key


def test_the_same_architecture_loads_every_tensor():
    base = _unet(BASE, seed=2)
    copy = UNetModel(BASE.unet).eval()
    assert start_from(copy, base) == []
    assert torch.equal(_call(copy), _call(base))


def test_a_base_that_does_not_fit_is_refused():
    wider = BASE.with_(unet=replace(BASE.unet, model_channels=64))
    with pytest.raises(UserError, match=r"time_embed.0.weight: the base U-Net.s is \(128, 32\)"):
        start_from(UNetModel(wider.unet), _unet(BASE, seed=3))
    # a base with attention the config lacks: its tensors have nowhere to go
    with pytest.raises(UserError, match="lacks"):
        start_from(UNetModel(BASE.unet), _unet(GROWN, seed=3))


@pytest.mark.slow
def test_fine_tune_run_keeps_the_base_vae_and_text_encoder(tmp_path):
    from ldm_cli.pipeline.load import load

    data = write_shapes_dataset(tmp_path / "shapes", 32, size=SIZE, seed=0)
    base = random_checkpoint(BASE, tmp_path / "base.safetensors", seed=5)
    (tmp_path / "base.clip-tower.safetensors").write_bytes(b"tower")  # copied, not read
    config_file = tmp_path / "grown.json"
    config_file.write_text(config_to_json(GROWN))
    run_dir = tmp_path / "run"
    args = [str(data), "--out", str(run_dir), "--config", str(config_file), "--base", str(base)]
    args += ["--unet-steps", "40", "--batch-size", "8", "--log-every", "5", "--sample-every", "0"]
    args += ["--threads", "1"]
    result = CliRunner().invoke(training_app(), args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    assert not (run_dir / "vae").exists() and not (run_dir / "text").exists()
    assert (run_dir / "clip_tower.safetensors").read_bytes() == b"tower"
    assert len(stage_losses(run_dir, "unet")) == 8
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["base"]["path"] == str(base)

    before, after = load_file(str(base)), load_file(str(run_dir / "model.safetensors"))
    frozen = [k for k in after if k.startswith(("first_stage_model.", "cond_stage_model."))]
    assert len(frozen) > 50
    for key in frozen:
        assert torch.equal(after[key], before[key]), key
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in after
    changed = [
        key
        for key, value in before.items()
        if key.startswith("model.diffusion_model.") and not torch.equal(after[key], value)
    ]
    assert changed  # the U-Net was trained
    pipe = load(run_dir / "model.safetensors", dtype="fp32")
    assert pipe.config.unet == GROWN.unet


def test_an_upscaler_base_is_refused_for_text_to_image(tmp_path):
    from ldm_cli.core.config import TINY_X4
    from ldm_cli.training.fine_tune import base_config

    with pytest.raises(UserError, match="x4 upscaler"):
        base_config(BASE, TINY_X4)


def test_an_sdxl_base_is_refused():
    from ldm_cli.core.config import TINY_SDXL
    from ldm_cli.training.fine_tune import base_config

    with pytest.raises(UserError, match="SD 1.x/2.x-shaped models only"):
        base_config(BASE, TINY_SDXL)


def test_without_config_a_base_is_fine_tuned_as_it_is(tmp_path):
    from ldm_cli.cli.train import training_config
    from ldm_cli.core.config import TINY_X4
    from ldm_cli.training.embedded_config import EMBEDDED

    assert training_config(None, None) == EMBEDDED
    base = random_checkpoint(BASE, tmp_path / "base.safetensors", seed=6)
    assert training_config(None, base).unet == BASE.unet
    assert training_config("embedded", base) == EMBEDDED  # a named config wins
    with pytest.raises(UserError, match="no such file"):
        training_config(None, tmp_path / "missing.safetensors")
    upscaler = random_checkpoint(TINY_X4, tmp_path / "x4.safetensors", seed=7)
    with pytest.raises(UserError, match="fine-tuning one is not supported"):
        training_config(None, upscaler)


def test_the_config_chooses_the_text_layer_the_unet_reads():
    from ldm_cli.training.fine_tune import base_config

    skip2 = BASE.with_(text=replace(BASE.text, clip_skip=2))
    assert base_config(skip2, BASE).text == replace(BASE.text, clip_skip=2)
    assert base_config(BASE, skip2).text.clip_skip == 1


def test_an_inpainting_base_is_refused():
    from ldm_cli.training.fine_tune import base_config

    inpainting = BASE.with_(unet=replace(BASE.unet, in_channels=9))
    with pytest.raises(UserError, match="inpainting"):
        base_config(inpainting, inpainting)


def test_v_prediction_trains_on_the_v_target():
    """v = sqrt(a) eps - sqrt(1 - a) x0 with min-SNR weight min(snr, 5) / (snr + 1); eps as
    before (weight min(snr, 5) / snr), so an SD 2.x 768-v base is fine-tuned as it predicts."""
    from ldm_cli.training.unet_stage import prediction_target

    x0, noise = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    a = torch.full((1, 1, 1, 1), 0.8)  # snr 4
    target, weight = prediction_target(x0, noise, a, "v")
    assert target.item() == pytest.approx(0.8**0.5 * -1 - 0.2**0.5 * 2)
    assert weight.item() == pytest.approx(4 / 5)
    target, weight = prediction_target(x0, noise, torch.full((1, 1, 1, 1), 0.9), "eps")
    assert target.item() == -1 and weight.item() == pytest.approx(5 / 9)


def test_flow_objective_fine_tunes_an_eps_base_into_a_flow_model(tmp_path):
    """`--objective flow`: the U-Net regresses the velocity noise - x0 at flow times; the
    exported file says prediction "flow" and renders through the flow samplers."""
    from ldm_cli.pipeline.load import load

    data = write_shapes_dataset(tmp_path / "shapes", 16, size=SIZE, seed=0)
    base = random_checkpoint(BASE, tmp_path / "base.safetensors", seed=5)
    run_dir = tmp_path / "run"
    args = [str(data), "--out", str(run_dir), "--base", str(base), "--objective", "flow"]
    args += ["--unet-steps", "10", "--batch-size", "4", "--log-every", "5", "--sample-every", "0"]
    args += ["--threads", "1"]
    result = CliRunner().invoke(training_app(), args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    pipe = load(run_dir / "model.safetensors", dtype="fp32")
    assert pipe.config.prediction == "flow" and pipe.default_sampler == "euler"
    (image,) = pipe.generate("a red circle", steps=3, seed=1)
    assert image.size == (SIZE, SIZE) and "Sampler: Euler," in image.info["parameters"]


def test_flow_loss_regresses_the_velocity():
    """At flow time t the U-Net sees (1 - t) x0 + t noise and timestep 1000 t; a U-Net that
    returns noise - x0 exactly has zero loss."""
    from ldm_cli.training.unet_stage import TrainingExamples, flow_loss

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    features = torch.randn(1, 77, 8)
    examples = TrainingExamples(latents, torch.zeros(3, dtype=torch.long), features, features[0])
    seen = {}

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, noisy, timesteps, context):
            t = (timesteps / 1000).view(-1, 1, 1, 1)
            x0 = latents[seen["rows"]]
            noise = (noisy - (1 - t) * x0) / t
            seen["t"] = timesteps
            return noise - x0

    seen["rows"] = torch.tensor([2, 0])
    loss = flow_loss(Oracle(), examples, seen["rows"], torch.Generator().manual_seed(1))
    assert loss.item() < 1e-8
    assert ((seen["t"] > 0) & (seen["t"] < 1000)).all()
