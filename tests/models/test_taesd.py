"""TAESD against diffusers' AutoencoderTiny, from each file layout, and its detection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm_cli.checkpoints.detect.taesd import TAESDPart, taesd_layout
from ldm_cli.checkpoints.file import read_header
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.models.taesd import TAESDConfig, TAESDDecoder, TAESDEncoder
from ldm_cli.models.taesd_loading import load_tiny_autoencoder
from ldm_cli.models.vae import AutoencoderKL
from tests.models.taesd_helpers import (
    diffusers_reference,
    original_shapes,
    random_original_state,
    write_taesd_files,
)

TOLERANCE = 1e-5
LATENT_SIZE = 8
LATENT_WIDTHS = (4, 16)  # taesd/taesdxl, taesd3/taef1


def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module", params=LATENT_WIDTHS)
def taesd_case(request, tmp_path_factory):
    """(latent channels, the three files, diffusers' AutoencoderTiny of the same weights)."""
    pytest.importorskip("diffusers")
    channels = request.param
    folder = tmp_path_factory.mktemp(f"taesd{channels}")
    return (
        channels,
        write_taesd_files(folder, channels, seed=channels),
        diffusers_reference(channels, seed=channels),
    )


def random_latents(channels: int) -> torch.Tensor:
    # spread past +-3 so the decoder's tanh clamp is exercised
    generator = torch.Generator().manual_seed(1)
    return 2.0 * torch.randn(1, channels, LATENT_SIZE, LATENT_SIZE, generator=generator)


def random_image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    side = 8 * LATENT_SIZE
    return torch.rand(1, 3, side, side, generator=generator) * 2 - 1


@pytest.mark.parametrize("channels", LATENT_WIDTHS)
def test_modules_carry_the_original_names(channels):
    config = TAESDConfig(latent_channels=channels)
    assert shapes_of(TAESDDecoder(config)) == original_shapes("decoder", channels)
    assert shapes_of(TAESDEncoder(config)) == original_shapes("encoder", channels)


@pytest.mark.parametrize("layout", ["decoder", "diffusers"])
@torch.no_grad()
def test_decode_matches_diffusers(taesd_case, layout):
    channels, paths, reference = taesd_case
    latents = random_latents(channels)
    ours = load_tiny_autoencoder(paths[layout]).decode(latents)
    theirs = reference.decode(latents).sample
    assert ours.shape == (1, 3, 8 * LATENT_SIZE, 8 * LATENT_SIZE)
    assert theirs.std() > 0.1  # not a flat image
    assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("layout", ["encoder", "diffusers"])
@torch.no_grad()
def test_encode_matches_diffusers(taesd_case, layout):
    channels, paths, reference = taesd_case
    image = random_image()
    ours = load_tiny_autoencoder(paths[layout]).encode(image)
    theirs = reference.encode(image).latents
    assert ours.shape == (1, channels, LATENT_SIZE, LATENT_SIZE)
    assert theirs.std() > 0.1
    assert (ours - theirs).abs().max().item() < TOLERANCE


def test_detects_each_layout(taesd_case):
    channels, paths, _ = taesd_case
    decoder = taesd_layout(read_header(paths["decoder"]))
    assert (decoder.latent_channels, decoder.decoder, decoder.encoder) == (
        channels,
        TAESDPart(""),
        None,
    )
    encoder = taesd_layout(read_header(paths["encoder"]))
    assert (encoder.latent_channels, encoder.decoder, encoder.encoder) == (
        channels,
        None,
        TAESDPart(""),
    )
    both = taesd_layout(read_header(paths["diffusers"]))
    assert both.latent_channels == channels
    assert both.decoder == TAESDPart("decoder.layers.", index_shift=1)
    assert both.encoder == TAESDPart("encoder.layers.")


def test_one_part_files_lack_the_other_part(taesd_case):
    _, paths, _ = taesd_case
    decoder_only = load_tiny_autoencoder(paths["decoder"])
    assert decoder_only.encoder is None
    with pytest.raises(UserError, match=paths["decoder"].name):
        decoder_only.encode(random_image())


def test_other_files_are_not_taesd():
    with torch.device("meta"):
        sd_vae = shapes_of(AutoencoderKL(TINY_SD1.vae))
    assert "encoder.down.0.block.0.conv1.weight" in sd_vae and "quant_conv.weight" in sd_vae
    assert taesd_layout(sd_vae) is None
    assert taesd_layout({"0.weight": (10, 5), "0.bias": (10,), "2.weight": (3, 10)}) is None
    assert taesd_layout({"model.diffusion_model.out.2.weight": (4, 320, 3, 3)}) is None
    # a TAESD decoder with a stray tensor of another model is not a TAESD file
    stray = original_shapes("decoder", 4) | {"first_stage_model.quant_conv.weight": (8, 8, 1, 1)}
    assert taesd_layout(stray) is None


def test_unknown_file_is_a_user_error(tmp_path):
    path = tmp_path / "not_taesd.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UserError, match="not_taesd.safetensors is not a TAESD"):
        load_tiny_autoencoder(path)


def test_truncated_file_is_a_user_error(tmp_path):
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(random_original_state("decoder", 4, seed=0), str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match="taesd_decoder.safetensors is truncated"):
        load_tiny_autoencoder(path)


def test_missing_and_misshapen_tensors_are_user_errors(tmp_path):
    state = random_original_state("decoder", 4, seed=0)
    path = tmp_path / "taesd_decoder.safetensors"
    save_file({k: v for k, v in state.items() if k != "7.weight"}, str(path))
    with pytest.raises(UserError, match=r"taesd_decoder.safetensors .*missing tensors \(7.weight"):
        load_tiny_autoencoder(path)
    save_file(state | {"7.weight": torch.zeros(64, 64, 1, 1)}, str(path))
    with pytest.raises(UserError, match=r"taesd_decoder.safetensors .*wrong shape \(7.weight"):
        load_tiny_autoencoder(path)
