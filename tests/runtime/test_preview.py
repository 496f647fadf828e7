"""`--preview`: the linear latent-to-RGB preview decoder, the preview file, its options."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.embedded import DEFAULT_NAME, WEIGHTS_DIR
from ldm_cli.pipeline.request import Request
from ldm_cli.runtime.preview import PreviewWriter, latents_to_rgb
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, written

EMBEDDED = WEIGHTS_DIR / DEFAULT_NAME
# Every colour channel varies across this scene (blue, green, yellow), so each channel's
# correlation means something; on a red star on white, red is constant and correlation noise.
SCENE = (
    "a large blue square in the top left and a green circle on the right, on a yellow background"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=5)


@pytest.mark.skipif(not EMBEDDED.exists(), reason="the embedded model is not in weights/")
def test_linear_preview_follows_the_vae_decode_of_a_generated_latent():
    pipe = ldm_cli.load(EMBEDDED, device="cpu", dtype="fp32")
    matrix = pipe.preview_matrix
    assert matrix.shape == (3, pipe.config.unet.out_channels + 1)
    assert pipe.preview_matrix is matrix  # fitted once per pipeline
    req = Request(SCENE, steps=15, seed=2, sampler="euler", width=64, height=64)
    cond, uncond = pipe.conditioning([req])
    noise, gen = pipe.initial_noise(req.seed, req.width, req.height)
    latents = pipe.sample(cond, uncond, noise, [gen], req)
    with torch.inference_mode():
        image = pipe.vae.decode(latents / pipe.config.vae.scale_factor).float().clamp(-1, 1)
    target = F.avg_pool2d(image, pipe.latent_factor)[0]  # the decode on the latent grid
    preview = latents_to_rgb(latents, matrix)[0]
    for c in range(3):
        assert target[c].std() > 0.2  # the scene varies in every channel
        r = torch.corrcoef(torch.stack([preview[c].flatten(), target[c].flatten()]))[0, 1]
        # measured 0.988, 0.802, 0.903 (the VAE of the 16-channel model before: 0.985, 0.926,
        # 0.937); a linear map is all a preview affords, and this VAE's green is less linear
        assert r > 0.75, f"channel {c}: correlation {r:.3f}"
    assert (preview - target).abs().mean() < 0.3  # measured 0.227 (of the range 2; before 0.26)


def test_preview_is_written_every_n_steps_and_at_the_last(tiny, tmp_path):
    pipe = ldm_cli.load(tiny, device="cpu")
    path = tmp_path / "preview.png"
    pipe.preview = writer = PreviewWriter(path, every=2)
    pipe.generate("a cat", steps=5, seed=1, sampler="euler", num_images=2, batch_size=2)
    assert writer.written == 3  # steps 2, 4 and 5
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        h, w = pipe.latent_shape(64, 64)[2:]
        assert image.height >= 128 and image.width == 2 * w * image.height // h  # side by side
    assert os.listdir(tmp_path) == ["preview.png"]  # no temporary file left behind


def test_preview_file_is_replaced_atomically(tiny, tmp_path, monkeypatch):
    """The PNG is complete under its temporary name, in the same folder, before the rename."""
    import ldm_cli.runtime.preview as preview

    renames = []
    real_replace = os.replace

    def checked_replace(src, dst):
        with Image.open(src) as image:
            image.load()  # a partial file would fail to decode
        assert os.path.dirname(src) == os.path.dirname(dst) and dst == str(tmp_path / "p.png")
        renames.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(preview.os, "replace", lambda s, d: checked_replace(str(s), str(d)))
    pipe = ldm_cli.load(tiny, device="cpu")
    pipe.preview = PreviewWriter(tmp_path / "p.png", every=1)
    pipe.generate("a cat", steps=3, seed=1, sampler="euler")
    assert len(renames) == 3


def test_cli_preview_writes_a_png(tiny, tmp_path):
    path = tmp_path / "live.png"
    proc = ldm(
        "generate", "a cat", "--model", str(tiny), "--steps", "3", "--seed", "1", "--device",
        "cpu", "--out", str(tmp_path / "out"), "--preview", str(path), "--preview-every", "2",
        "--offload", "none",
    )  # fmt: skip
    assert len(written(proc)) == 1
    with Image.open(path) as image:
        assert image.format == "PNG"


@pytest.mark.parametrize("command", [["generate", "a cat"], ["img2img", "in.png", "a cat"]])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--preview-every", "0"], "error: --preview-every must be at least 1, got 0"),
        (["--preview", "no/such/folder/p.png"], "error: --preview: folder no/such/folder does"),
    ],
)
def test_bad_preview_options_are_one_line_errors(command, options, message, tmp_path):
    proc = ldm(*command, *options, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1


def test_preview_never_replaces_a_file_it_did_not_write(tiny, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "red").save(photo)
    before = photo.read_bytes()
    for command in (["generate", "a cat"], ["img2img", str(photo), "a cat"]):
        proc = ldm(
            *command, "--model", str(tiny), "--steps", "2", "--out", str(tmp_path / "out"),
            "--preview", str(photo), check=False,
        )  # fmt: skip
        assert proc.returncode == 2
        assert proc.stderr == (
            f"error: --preview {photo} exists and is not an ldm preview; give a new file name "
            "(a preview replaces only a preview)\n"
        )
        assert photo.read_bytes() == before
        assert not (tmp_path / "out").exists()  # refused before anything ran
    with pytest.raises(ldm_cli.core.errors.UserError, match="is not an ldm preview"):
        PreviewWriter(photo)


def test_preview_of_an_earlier_run_is_replaced(tiny, tmp_path):
    path = tmp_path / "live.png"
    pipe = ldm_cli.load(tiny, device="cpu")
    for seed in (1, 2):
        pipe.preview = writer = PreviewWriter(path, every=1)
        pipe.generate("a cat", steps=2, seed=seed, sampler="euler")
        assert writer.written == 2


def test_a_failed_preview_write_warns_once_and_the_run_goes_on(tiny, tmp_path, monkeypatch, capsys):
    import ldm_cli.runtime.preview as preview

    calls = []

    def full_disk(image, path):
        calls.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preview, "write_png_atomic", full_disk)
    pipe = ldm_cli.load(tiny, device="cpu")
    pipe.preview = writer = PreviewWriter(tmp_path / "p.png", every=1)
    (image,) = pipe.generate("a cat", steps=3, seed=1, sampler="euler")
    assert image.size == (64, 64) and writer.written == 0 and len(calls) == 1
    warning = f"warning: preview {tmp_path / 'p.png'} not written (No space left on device); "
    assert capsys.readouterr().err == warning + "previews stop\n"
