"""The shared modes on a FLUX model: the hires fix (an upscale, then img2img on the flow path)
and step previews (a latent-to-RGB map fitted to the 16-channel VAE)."""

from __future__ import annotations

import pytest
from PIL import Image

import ldm_cli
from ldm_cli.runtime.preview import PreviewWriter
from ldm_cli.testing import TINY_FLUX_DEV, random_flow_checkpoint


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = random_flow_checkpoint(TINY_FLUX_DEV, tmp_path_factory.mktemp("flux") / "f.safetensors")
    return ldm_cli.load(path, device="cpu")


def test_hires_fix_renders_at_twice_the_size(pipe):
    hires = ldm_cli.HiresFix(2.0, 0.5)
    (image,) = pipe.generate("a cat", seed=1, steps=2, width=64, height=64, hires=hires)
    assert image.size == (128, 128)
    text = image.info["parameters"]
    assert "Hires upscale: 2" in text and "Distilled CFG Scale: 3.5" in text


def test_previews_of_a_16_channel_model(pipe, tmp_path):
    pipe.preview = PreviewWriter(tmp_path / "preview.png", every=1)
    try:
        pipe.generate("a cat", seed=1, steps=2, width=64, height=64)
    finally:
        pipe.preview = None
    assert pipe.preview_matrix.shape == (3, 17)  # 16 channels and a bias
    with Image.open(tmp_path / "preview.png") as preview:
        assert preview.size[0] > 0
