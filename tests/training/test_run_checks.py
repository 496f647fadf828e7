"""`ldm train model` refuses before training: a run folder made from other data, a --size larger
than the images, and a --config that does not fit --base."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from ldm_cli.checkpoints.detect import config_to_json
from ldm_cli.core.config import TINY_SD1, TINY_SD2
from ldm_cli.core.errors import UserError
from ldm_cli.data.shapes_writer import write_shapes_dataset
from ldm_cli.testing import random_checkpoint
from ldm_cli.training.plan import check_run_data, run_data
from tests.training.test_training import training_app

SIZE = 32
TINY = TINY_SD1.with_(
    unet=replace(TINY_SD1.unet, model_channels=32, attention_resolutions=(2,)),
    default_size=SIZE,
)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 16, size=SIZE, seed=0)


def _refused(args: list[str]) -> str:
    result = CliRunner().invoke(training_app(), [str(a) for a in args])
    assert isinstance(result.exception, UserError), result.output + repr(result.exception)
    message = str(result.exception)
    assert "\n" not in message
    return message


def test_another_data_folder_in_a_finished_run_folder_is_refused(shapes_dir, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(config_to_json(TINY))
    run = tmp_path / "run"
    run.mkdir()
    made_from = tmp_path / "data-a"
    data = {"folder": str(made_from), "images": 40, "train": 36, "heldout": 4}
    (run / "metrics.json").write_text(json.dumps({"data": data, "export": {"file_mb": 1}}))
    message = _refused([shapes_dir, "--out", run, "--config", config, "--unet-steps", "1"])
    assert message == (
        f'{run} holds a run made with folder "{made_from}", not "{shapes_dir.resolve()}"; '
        "images 40, not 16; train 36, not 12; give this one a new --out"
    )
    assert json.loads((run / "metrics.json").read_text())["data"] == data  # not rewritten
    assert not (run / "train_log.jsonl").exists()


def test_run_data_must_match_the_folders_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    check_run_data(run, run_data(tmp_path, 10, 8, 2), None)  # a new folder: nothing to match
    record = run_data(tmp_path, 10, 8, 2)
    (run / "metrics.json").write_text(json.dumps({"data": record}))
    check_run_data(run, run_data(tmp_path / "." / "", 10, 8, 2), None)  # the same folder
    with pytest.raises(UserError, match="heldout 2, not 3"):
        check_run_data(run, run_data(tmp_path, 10, 7, 3), None)
    # a run from scratch is not continued on a base's VAE and text encoder
    with pytest.raises(UserError, match=rf'base none, not "{tmp_path}/b.safetensors"'):
        check_run_data(run, record, tmp_path / "b.safetensors")
    # folders written before the data folder was recorded: the counts are compared
    (run / "metrics.json").write_text(json.dumps({"data": {"images": 10, "train": 8}}))
    check_run_data(run, run_data(tmp_path / "other", 10, 8, 2), tmp_path / "b.safetensors")
    with pytest.raises(UserError, match="images 10, not 11"):
        check_run_data(run, run_data(tmp_path, 11, 9, 2), None)


def test_a_size_larger_than_the_images_is_refused(shapes_dir, tmp_path):
    out = tmp_path / "run"
    args = [shapes_dir, "--out", out, "--size", "64", "--vae-steps", "1"]  # embedded: f=4
    message = _refused(args)
    assert message.startswith(f"--size 64 is larger than the images of {shapes_dir}: ")
    assert "is 32x32" in message and "at most 32 px" in message
    assert not out.exists()


def test_a_config_of_another_family_than_the_base_is_refused(shapes_dir, tmp_path):
    sd2 = random_checkpoint(TINY_SD2, tmp_path / "sd2.safetensors", seed=1)
    out = tmp_path / "run"
    args = [shapes_dir, "-o", out, "--config", "tiny-sd1", "--base", sd2, "--unet-steps", "1"]
    message = _refused(args)
    assert message.startswith(
        "--config tiny-sd1 is a Stable Diffusion 1.x (sd1) model but --base sd2.safetensors is "
        "Stable Diffusion 2.x (sd2)"
    )
    assert not out.exists()


def test_a_config_whose_unet_does_not_fit_the_base_is_refused(shapes_dir, tmp_path):
    wider = TINY.with_(unet=replace(TINY.unet, model_channels=64))
    base = random_checkpoint(wider, tmp_path / "base.safetensors", seed=2)
    out = tmp_path / "run"
    args = [shapes_dir, "-o", out, "--config", "tiny-sd1", "--base", base, "--size", "32"]
    message = _refused([*args, "--unet-steps", "1"])
    assert message.startswith("--config tiny-sd1 does not fit --base base.safetensors: ")
    assert message.endswith(": the base U-Net's is (64,), this config's (32,)")
    assert not out.exists()
