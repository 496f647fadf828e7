"""The autoencoder against diffusers' AutoencoderKL, loaded through diffusers' own converter."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli.core.config import SD15, TINY_SD1, X4_UPSCALER, VAEConfig
from ldm_cli.models.vae import AutoencoderKL
from tests.reference_configs import diffusers_vae_config

diffusers = pytest.importorskip("diffusers")
skimage_data = pytest.importorskip("skimage.data")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

X4_UPSCALER_VAE = X4_UPSCALER.vae  # yaml/x4-upscaling.yaml's first stage

TINY_CONFIGS = {
    "tiny-sd1": TINY_SD1.vae,
    "tiny-3-levels": replace(TINY_SD1.vae, ch_mult=(1, 2, 2), num_res_blocks=2),
}
TOLERANCE = 1e-5


def to_diffusers_state_dict(ours: dict[str, torch.Tensor], config: dict) -> dict:
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.items()}
    return convert_ldm_vae_checkpoint(checkpoint, config)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights everywhere, norms included (their defaults are trivial)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if ".norm" in name or name.startswith(("encoder.norm", "decoder.norm")):
            p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
        elif p.ndim > 1:
            p.copy_(noise / p[0].numel() ** 0.5)
        else:
            p.copy_(0.1 * noise)
    # A trained decoder's output lies in about [-1, 1]; shrink the random one's to match, so the
    # absolute tolerance means the same as it would on real weights (fp32 errors are relative).
    model.decoder.conv_out.weight.mul_(0.2)


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    image = Image.fromarray(skimage_data.astronaut()).resize((64, 64), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return x.unsqueeze(0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_matches_diffusers_encode_and_decode(name, astronaut):
    cfg = TINY_CONFIGS[name]
    ours = AutoencoderKL(cfg).eval()
    randomize_(ours, seed=0)
    config = diffusers_vae_config(cfg)
    theirs = diffusers.AutoencoderKL(**config).eval()
    theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict(), config), strict=True)

    posterior = ours.encode(astronaut)
    reference = theirs.encode(astronaut).latent_dist
    assert posterior.mean.shape == (1, cfg.z_channels, 64 // cfg.downscale, 64 // cfg.downscale)
    diffs = {
        "mean": max_diff(posterior.mean, reference.mean),
        "logvar": max_diff(posterior.logvar, reference.logvar),
        "sample": max_diff(
            posterior.sample(torch.Generator().manual_seed(7)),
            reference.sample(torch.Generator().manual_seed(7)),
        ),
    }
    # Decode a latent with realistic statistics: the diffusers mean plus fixed noise.
    z = reference.mean + 0.5 * torch.randn(
        reference.mean.shape, generator=torch.Generator().manual_seed(1)
    )
    image = ours.decode(z)
    diffs["decode"] = max_diff(image, theirs.decode(z).sample)
    print(name, diffs)
    assert image.shape == astronaut.shape
    assert 0.2 < image.abs().max() < 3.0  # a realistic range, not a degenerate comparison
    assert all(d <= TOLERANCE for d in diffs.values()), diffs


def meta_vae(cfg: VAEConfig) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(cfg)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_full_size_parameter_counts():
    assert parameter_count(meta_vae(SD15.vae)) == 83_653_863
    assert parameter_count(meta_vae(X4_UPSCALER_VAE)) == 55_325_927
    assert X4_UPSCALER_VAE.downscale == 4


def test_sd15_keys_follow_the_original_layout():
    keys = set(meta_vae(SD15.vae).state_dict())
    present = [
        "encoder.conv_in.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.mid.block_2.norm2.bias",
        "encoder.norm_out.weight",
        "decoder.up.0.block.2.conv2.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",  # 256 -> 128 at the highest resolution
        "decoder.up.3.upsample.conv.weight",
        "decoder.mid.attn_1.q.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]
    absent = [
        "encoder.down.3.downsample.conv.weight",
        "decoder.up.0.upsample.conv.weight",
        "decoder.up.3.block.0.nin_shortcut.weight",
    ]
    assert keys.issuperset(present)
    assert keys.isdisjoint(absent)
    assert not any(".attn.0." in k for k in keys)


@pytest.mark.parametrize(("subdir", "cfg"), [("sd15", SD15.vae), ("x4-upscaler", X4_UPSCALER_VAE)])
def test_converted_keys_load_strictly_into_reference_diffusers_model(reference_dir, subdir, cfg):
    accelerate = pytest.importorskip("accelerate")
    path = os.path.join(reference_dir, subdir, "vae", "config.json")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present")
    with open(path) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    with accelerate.init_empty_weights():
        theirs = diffusers.AutoencoderKL(**config)
    converted = to_diffusers_state_dict(meta_vae(cfg).state_dict(), config)
    # strict: every key present on both sides; shape mismatches raise as well
    theirs.load_state_dict(converted, strict=True, assign=True)
    assert parameter_count(theirs) == parameter_count(meta_vae(cfg))


@torch.no_grad()
def test_meta_built_model_loads_with_assign(astronaut):
    source = AutoencoderKL(TINY_SD1.vae).eval()
    randomize_(source, seed=3)
    target = meta_vae(TINY_SD1.vae)
    target.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in target.state_dict().values())
    assert torch.equal(target.eval().encode(astronaut).mean, source.encode(astronaut).mean)


@torch.no_grad()
def test_posterior_sampling_is_seeded_and_mode_is_mean(astronaut):
    model = AutoencoderKL(TINY_SD1.vae).eval()
    randomize_(model, seed=5)
    posterior = model.encode(astronaut)
    first = posterior.sample(torch.Generator().manual_seed(42))
    again = posterior.sample(torch.Generator().manual_seed(42))
    other = posterior.sample(torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(posterior.mode(), posterior.mean)
    assert torch.allclose(posterior.std, torch.exp(0.5 * posterior.logvar))
    kl = posterior.kl()
    assert kl.shape == (1,) and kl.item() >= 0

    recon, forward_posterior = model(astronaut, generator=torch.Generator().manual_seed(42))
    assert torch.equal(recon, model.decode(first))
    assert torch.equal(forward_posterior.mean, posterior.mean)
    deterministic, _ = model(astronaut, sample_posterior=False)
    assert torch.equal(deterministic, model.decode(posterior.mean))


def test_training_step_backpropagates(astronaut):
    model = AutoencoderKL(TINY_SD1.vae)
    recon, posterior = model(astronaut[:, :, :16, :16], generator=torch.Generator().manual_seed(0))
    loss = (recon - astronaut[:, :, :16, :16]).abs().mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@torch.no_grad()
def test_attention_at_listed_resolutions_uses_original_names(astronaut):
    # Not used by the SD families, but part of the original ddconfig: attention after every
    # resnet block of the levels whose resolution is listed (here the 32x32 ones).
    cfg = replace(TINY_SD1.vae, resolution=64, attn_resolutions=(32,))
    model = AutoencoderKL(cfg).eval()
    keys = set(model.state_dict())
    assert {"encoder.down.1.attn.0.q.weight", "decoder.up.1.attn.1.proj_out.weight"} <= keys
    assert not any(k.startswith(("encoder.down.0.attn", "decoder.up.0.attn")) for k in keys)
    assert model(astronaut, sample_posterior=False)[0].shape == astronaut.shape
