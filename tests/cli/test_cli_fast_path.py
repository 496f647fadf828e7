"""The few-step and decoder options from the command line: `--sampler lcm|tcd`, `--scheduler
trailing`, `--eta`, `--vae FILE` (a VAE or a TAESD), and `--from-png` of their images."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save_file

from ldm_cli.core.pngmeta import params_from_png
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.testing import random_checkpoint, randomize_
from tests.cli_helpers import ldm, one_thread_per_command, pixels, written  # noqa: F401
from tests.models.taesd_helpers import write_taesd_files
from tests.pipeline.test_vae_file import TINY_SD1_X8

BASE = ("--steps", "2", "--width", "64", "--height", "64", "--seed", "3")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast")
    model = random_checkpoint(TINY_SD1_X8, folder / "tiny-x8.safetensors", seed=2)
    vae = randomize_(AutoencoderKL(TINY_SD1_X8.vae), seed=9).state_dict()
    save_file({k: v.contiguous() for k, v in vae.items()}, str(folder / "my-vae.safetensors"))
    taesd = write_taesd_files(folder, latent_channels=4, seed=4)["decoder"]
    return model, folder / "my-vae.safetensors", taesd


def test_lcm_and_tcd_runs_record_their_settings_and_come_back_from_png(files, tmp_path):
    model, _, _ = files
    out = tmp_path / "out"
    args = ("generate", "a red square", "--model", str(model), *BASE, "-o", str(out))
    (lcm,) = written(ldm(*args, "--sampler", "lcm", "--cfg", "1.5"))
    params = params_from_png(lcm)
    assert (params.sampler, params.scheduler) == ("lcm", "lcm")
    (tcd,) = written(ldm(*args, "--sampler", "tcd", "--eta", "0.6", "--cfg", "1"))
    assert params_from_png(tcd).extra["Eta"] == "0.6"
    (again,) = written(
        ldm("generate", "--from-png", str(tcd), "--model", str(model), "-o", str(out))
    )
    assert np.array_equal(pixels(again), pixels(tcd))
    (trailing,) = written(ldm(*args, "--sampler", "euler", "--scheduler", "trailing"))
    assert params_from_png(trailing).scheduler == "trailing"
    bad = ldm(*args, "--sampler", "euler", "--eta", "0.5", check=False)
    assert bad.returncode != 0 and "--eta is for the samplers that add noise" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_vae_files_are_named_in_the_png_and_asked_for_by_from_png(files, tmp_path):
    model, vae, taesd = files
    out = tmp_path / "out"
    args = ("generate", "a red square", "--model", str(model), *BASE, "-o", str(out))
    (own,) = written(ldm(*args))
    (with_vae,) = written(ldm(*args, "--vae", str(vae)))
    (drafted,) = written(ldm(*args, "--vae", str(taesd)))
    assert params_from_png(with_vae).extra["VAE"] == "my-vae"
    assert "VAE" not in params_from_png(own).extra
    assert np.abs(pixels(own).astype(int) - pixels(with_vae)).max() > 20
    assert pixels(drafted).shape == pixels(own).shape
    again = ldm("generate", "--from-png", str(with_vae), "--model", str(model), "-o", str(out))
    assert "was decoded with the VAE my-vae [" in again.stderr
    same = ldm(
        "generate", "--from-png", str(with_vae), "--model", str(model), "--vae", str(vae),
        "-o", str(out),
    )  # fmt: skip
    assert "VAE" not in same.stderr
    assert np.array_equal(pixels(written(same)[0]), pixels(with_vae))
    bad = ldm(*args, "--vae", str(model), check=False)
    assert bad.returncode != 0 and "is not a VAE file" in bad.stderr
