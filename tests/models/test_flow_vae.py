"""The 16-channel VAE of FLUX.1 and SD3 against diffusers' AutoencoderKL.

The reference loads the way a user loads BFL's ``ae.safetensors``: our state dict, whose keys
are those of that file (``encoder.*``/``decoder.*``, no ``first_stage_model.`` prefix, no quant
convolutions), goes through diffusers' ``AutoencoderKL.from_single_file`` (its LDM VAE converter
takes unprefixed keys as they are) with a diffusers config folder: a tiny one written here, and
FLUX.1 [dev]'s own ``vae/config.json`` for the real widths.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_cli.core.config import VAEConfig
from ldm_cli.core.flow_config import FLUX_VAE, SD3_VAE
from ldm_cli.models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
skimage_data = pytest.importorskip("skimage.data")

from tests.flow_helpers import vae_from_single_file, vae_reference  # noqa: E402

TOLERANCE = 1e-5
FULL_SIZE_TOLERANCE = 1e-4
TINY_FLUX_VAE = replace(FLUX_VAE, ch=32, ch_mult=(1, 2), num_res_blocks=1)


@torch.no_grad()
def randomized_vae(cfg: VAEConfig, seed: int) -> AutoencoderKL:
    """Unit-fan-in random weights, norms near 1; the decoder's output scaled to about [-1, 1]."""
    model = AutoencoderKL(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if ".norm" in name or name.startswith(("encoder.norm", "decoder.norm")):
            parameter.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
        elif parameter.ndim > 1:
            parameter.copy_(noise / parameter[0].numel() ** 0.5)
        else:
            parameter.copy_(0.1 * noise)
    model.decoder.conv_out.weight.mul_(0.2)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    image = Image.fromarray(skimage_data.astronaut()).resize((64, 64), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return x.unsqueeze(0)


def test_state_dict_is_the_ae_safetensors_layout():
    with torch.device("meta"):
        keys = set(AutoencoderKL(FLUX_VAE).state_dict())
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
    assert "encoder.conv_out.weight" in keys and "decoder.conv_in.weight" in keys
    with torch.device("meta"):
        model = AutoencoderKL(FLUX_VAE)
    assert model.encoder.conv_out.weight.shape[0] == 32  # mean and log-variance of 16 channels
    assert model.decoder.conv_in.weight.shape[1] == 16
    assert SD3_VAE.use_quant_conv is False and SD3_VAE.z_channels == 16


@torch.no_grad()
def test_tiny_flux_vae_matches_diffusers_from_single_file(tmp_path, astronaut):
    ours = randomized_vae(TINY_FLUX_VAE, seed=0)
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    theirs = vae_reference(TINY_FLUX_VAE, str(path), tmp_path)
    assert not theirs.config.use_quant_conv and theirs.quant_conv is None
    assert theirs.config.latent_channels == 16
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())

    posterior = ours.encode(astronaut)
    reference = theirs.encode(astronaut).latent_dist
    z = reference.mean + 0.5 * torch.randn(
        reference.mean.shape, generator=torch.Generator().manual_seed(1)
    )
    image = ours.decode(z)
    diffs = {
        "mean": max_diff(posterior.mean, reference.mean),
        "logvar": max_diff(posterior.logvar, reference.logvar),
        "decode": max_diff(image, theirs.decode(z).sample),
    }
    print("tiny flux vae", diffs)
    assert posterior.mean.shape == (1, 16, 32, 32)
    assert 0.2 < image.abs().max() < 3.0  # a realistic range, not a degenerate comparison
    assert all(d <= TOLERANCE for d in diffs.values()), diffs


@pytest.mark.slow
@torch.no_grad()
def test_full_width_flux_vae_decode_matches_diffusers(reference_dir):
    config_dir = os.path.join(reference_dir, "flux-dev-d1")
    if not os.path.isfile(os.path.join(config_dir, "vae", "config.json")):
        pytest.skip(f"{config_dir}/vae/config.json not present")
    ours = randomized_vae(FLUX_VAE, seed=1)
    theirs = vae_from_single_file(ours.state_dict(), config_dir)
    assert theirs.config.scaling_factor == FLUX_VAE.scale_factor
    assert theirs.config.shift_factor == FLUX_VAE.shift_factor
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    image = ours.decode(z)
    diff = max_diff(image, theirs.decode(z).sample)
    print("full-width flux vae decode", diff, image.abs().max().item())
    assert image.shape == (1, 3, 128, 128)
    assert 0.2 < image.abs().max() < 10.0
    assert diff <= FULL_SIZE_TOLERANCE
