"""`ldm train`: a tiny end-to-end run, exact resume, and the dataset reader."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from ldm_cli.cli.train import train
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.data.shapes_writer import write_shapes_dataset
from ldm_cli.models.text_encoder import CLIPTextEncoder
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.training.dataset import holdout_split, load_captioned_images
from ldm_cli.training.loop import StepRandom
from ldm_cli.training.settings import LoopOptions, StageSettings
from ldm_cli.training.unet_stage import train_unet, weights_path

SIZE = 32
IMAGES = 64
# TINY_SD1 with a narrower U-Net so the whole file stays fast on two cores.
TINY = TINY_SD1.with_(
    unet=replace(TINY_SD1.unet, model_channels=32, attention_resolutions=(2,)),
    default_size=SIZE,
)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), IMAGES, size=SIZE, seed=0)


def training_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(train)
    return app


def stage_losses(run_dir, stage: str) -> list[float]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["stage"] == stage]


def _falls(losses: list[float]) -> bool:
    fifth = max(1, len(losses) // 5)
    return sum(losses[-fifth:]) / fifth < sum(losses[:fifth]) / fifth


@pytest.mark.slow
def test_train_all_stages_exports_a_loadable_model(shapes_dir, tmp_path):
    from ldm_cli.checkpoints.detect import config_to_json
    from ldm_cli.cli.info import info
    from ldm_cli.models.loading import load_model
    from ldm_cli.pipeline.load import load

    config_file = tmp_path / "tiny.json"
    config_file.write_text(config_to_json(TINY))
    run_dir = tmp_path / "run"
    args = [str(shapes_dir), "--out", str(run_dir), "--config", str(config_file)]
    args += ["--vae-steps", "150", "--text-steps", "100", "--unet-steps", "150"]
    args += ["--vae-batch-size", "8", "--text-batch-size", "16", "--batch-size", "16"]
    args += ["--lr", "2e-3", "--log-every", "5", "--sample-every", "0", "--export-dtype", "fp16"]
    args += ["--threads", "1"]
    result = CliRunner().invoke(training_app(), args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    for stage in ("vae", "text", "unet"):
        losses = stage_losses(run_dir, stage)
        assert len(losses) >= 20 and _falls(losses), (stage, losses)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["vae"]["psnr_db"] > 15
    assert 0 < metrics["vae"]["scale_factor"] < 100
    assert 0 <= metrics["text"]["retrieval_top1"] <= 1
    assert (run_dir / "clip_tower.safetensors").is_file()
    assert (run_dir / "samples" / "unet_000150.png").is_file()

    path = run_dir / "model.safetensors"
    model, header = load_model(path)  # strict: every key present, none extra
    assert model.config.vae.scale_factor == metrics["vae"]["scale_factor"]
    assert model.config.default_size == SIZE
    assert all(t.dtype == torch.float16 for t in load_file(path).values() if t.is_floating_point())
    image = load(path).generate("a large red circle in the center", steps=4, seed=0, cfg=3.0)[0]
    assert image.size == (SIZE, SIZE)
    info(path, prediction=None)

    # Every stage is done: a second run skips them all and only re-exports.
    log = (run_dir / "train_log.jsonl").read_text()
    again = CliRunner().invoke(training_app(), args)
    assert again.exit_code == 0, again.output
    assert (run_dir / "train_log.jsonl").read_text() == log
    for stage in ("vae", "text", "unet"):
        assert f"{stage}: trained already (" in again.output, again.output


def _unet_run(run_dir, data, steps: int, stop_after: int | None, resume: bool):
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY.vae).eval()
    text_encoder = CLIPTextEncoder(TINY.text).eval()
    train_idx, heldout_idx = holdout_split(len(data), 4, 0)
    options = LoopOptions(
        run_dir,
        seed=3,
        resume=resume,
        log_every=2,
        stop_after=stop_after,
        quiet=True,
        samples=False,
        threads=1,
    )
    settings = StageSettings(steps, 8, 1e-3, warmup=3)
    return train_unet(
        TINY, vae, text_encoder, data.subset(train_idx), data.subset(heldout_idx), settings, options
    )


def test_resume_continues_exactly(shapes_dir, tmp_path):
    data = load_captioned_images(shapes_dir, SIZE)
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"

    assert _unet_run(interrupted, data, 12, stop_after=6, resume=False) is None
    assert not weights_path(LoopOptions(interrupted)).exists()
    assert [r["step"] for r in map(json.loads, (interrupted / "train_log.jsonl").open())] == [
        2,
        4,
        6,
    ]
    with pytest.raises(UserError, match="--resume"):
        _unet_run(interrupted, data, 12, stop_after=None, resume=False)
    resumed = _unet_run(interrupted, data, 12, stop_after=None, resume=True)
    steps = [r["step"] for r in map(json.loads, (interrupted / "train_log.jsonl").open())]
    assert steps == [2, 4, 6, 8, 10, 12]

    reference = _unet_run(straight, data, 12, stop_after=None, resume=False)
    assert resumed.metrics["steps"] == reference.metrics["steps"] == 12
    resumed_state, reference_state = resumed.unet.state_dict(), reference.unet.state_dict()
    for key, value in reference_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=0, msg=key)


def test_a_restart_without_state_drops_the_killed_runs_log_lines(shapes_dir, tmp_path):
    """A run killed before its first state save starts over; its log lines go with it."""
    data = load_captioned_images(shapes_dir, SIZE)
    run = tmp_path / "run"
    run.mkdir()
    stale = [
        {"stage": "vae", "step": 10},
        {"stage": "unet", "step": 2},
        {"stage": "unet", "step": 4},
    ]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    _unet_run(run, data, 12, stop_after=4, resume=False)
    records = [json.loads(line) for line in (run / "train_log.jsonl").open()]
    assert [(r["stage"], r["step"]) for r in records] == [("vae", 10), ("unet", 2), ("unet", 4)]
    assert "loss" in records[1] and "loss" in records[2]  # the new run's lines, once each


def test_batches_walk_seeded_epochs():
    seen = torch.cat([StepRandom(7, "unet", step, 0, 1).batch_indices(10, 5) for step in range(4)])
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])
    # two processes split the same global batch
    halves = [StepRandom(7, "unet", 1, rank, 2).batch_indices(10, 3) for rank in (0, 1)]
    assert sorted(torch.cat(halves).tolist()) == sorted(
        StepRandom(7, "unet", 1, 0, 1).batch_indices(10, 6).tolist()
    )


def test_dataset_reads_txt_captions_and_metadata(tmp_path):
    from PIL import Image

    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (40, 20), colour).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a {colour} picture\n")
    data = load_captioned_images(tmp_path, 16)
    assert data.images.shape == (2, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.captions == ["a red picture", "a blue picture"]
    assert data.images[1, 2].float().mean() > 200  # blue channel of the blue image

    (tmp_path / "metadata.jsonl").write_text('{"file_name": "1.png", "text": "override"}\n')
    assert load_captioned_images(tmp_path, 16).captions == ["override"]

    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "1.txt").unlink()
    with pytest.raises(UserError, match="no caption"):
        load_captioned_images(tmp_path, 16)
    with pytest.raises(UserError, match="does not exist"):
        load_captioned_images(tmp_path / "missing", 16)


def test_bad_options_are_user_errors(shapes_dir, tmp_path):
    result = CliRunner().invoke(
        training_app(), [str(shapes_dir), "--out", str(tmp_path), "--config", "nope"]
    )
    assert isinstance(result.exception, UserError) and "unknown --config" in str(result.exception)
    result = CliRunner().invoke(
        training_app(), [str(shapes_dir), "--out", str(tmp_path), "--size", "30"]
    )
    assert isinstance(result.exception, UserError) and "--size" in str(result.exception)
    from ldm_cli.checkpoints.detect import config_to_json
    from ldm_cli.core.config import SD15_INPAINT

    inpaint = tmp_path / "inpaint.json"
    inpaint.write_text(config_to_json(SD15_INPAINT))
    result = CliRunner().invoke(
        training_app(), [str(shapes_dir), "-o", str(tmp_path), "--config", str(inpaint)]
    )
    assert isinstance(result.exception, UserError), result.output
    assert "takes 9 channels (an inpainting layout)" in str(result.exception)
    result = CliRunner().invoke(
        training_app(), [str(shapes_dir), "-o", str(tmp_path), "--config", "sd15-inpaint"]
    )
    assert "unknown --config 'sd15-inpaint'" in str(result.exception)
