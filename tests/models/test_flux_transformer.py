"""FLUX.1's transformer against diffusers' FluxTransformer2DModel, fed as FluxPipeline feeds it."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from ldm_cli.core.flow_config import FluxConfig
from ldm_cli.models.flux import FluxTransformer

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_flux_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import save_file  # noqa: E402

from tests.flow_helpers import (  # noqa: E402
    flux_diffusers_config,
    flux_reference,
    flux_to_diffusers,
)

TOLERANCE = 1e-5  # absolute, on outputs of magnitude 3-4
BF16_TOLERANCE = 0.05  # a few bf16 steps at that magnitude (0.016 each)
GUIDANCE = 3.5
TINY = FluxConfig(
    vec_in_dim=32,
    context_in_dim=48,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 12, 12),
)
DEV_TENSORS = 780
DEV_PARAMETERS = 11_901_408_320
GUIDANCE_IN_PARAMETERS = 256 * 3072 + 3072 + 3072 * 3072 + 3072


def random_state(model: torch.nn.Module, seed: int, std: float = 0.02) -> dict:
    """Seeded weights for every tensor: small normal ones, the q/k norms' scales around 1."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        noise = torch.randn(p.shape, generator=g)
        state[name] = 1.0 + 0.1 * noise if name.endswith(".scale") else std * noise
    return state


def inputs(cfg: FluxConfig, batch: int, size: int, tokens: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, cfg.in_channels // 4, size, size, generator=g),
        "sigma": torch.tensor([0.75, 0.3])[:batch],
        "context": torch.randn(batch, tokens, cfg.context_in_dim, generator=g),
        "y": torch.randn(batch, cfg.vec_in_dim, generator=g),
        "guidance": torch.full((batch,), GUIDANCE) if cfg.guidance_embed else None,
    }


@torch.no_grad()
def diffusers_velocity(model: FluxTransformer2DModel, x, sigma, context, y, guidance):
    """As FluxPipeline's denoising loop calls the transformer (timestep = t / 1000 = sigma)."""
    batch, channels, height, width = x.shape
    latents = FluxPipeline._pack_latents(x, batch, channels, height, width)
    img_ids = FluxPipeline._prepare_latent_image_ids(
        batch, height // 2, width // 2, x.device, x.dtype
    )
    txt_ids = torch.zeros(context.shape[1], 3, dtype=x.dtype)
    packed = model(
        hidden_states=latents,
        timestep=sigma,
        guidance=guidance,
        pooled_projections=y,
        encoder_hidden_states=context,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    # _unpack_latents takes the image size in pixels and the VAE's factor
    return FluxPipeline._unpack_latents(packed, height * 8, width * 8, 8)


def report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"{name}: max |diff| {diff:.3g}, max |output| {scale:.3g}")
    return diff


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
@torch.no_grad()
def test_tiny_matches_diffusers(guidance_embed):
    cfg = replace(TINY, guidance_embed=guidance_embed)
    with torch.device("meta"):
        ours = FluxTransformer(cfg)
    state = random_state(ours, seed=0, std=0.1)
    ours.load_state_dict(state, strict=True, assign=True)
    theirs = flux_reference(cfg, state)

    feed = inputs(cfg, batch=2, size=8, tokens=7, seed=1)
    velocity = ours(**feed)
    assert velocity.shape == feed["x"].shape
    reference = diffusers_velocity(theirs, **feed)
    assert report(f"tiny {cfg.guidance_embed=}", velocity, reference) <= TOLERANCE
    assert torch.equal(ours(**feed), velocity)

    # bf16 weights: computed in bf16, returned in the latents' dtype. Both round the time to
    # bf16 before the factor 1000 (as BFL's sampler does), so they agree to bf16 rounding.
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    assert ours(**feed).dtype == torch.float32
    narrow = {k: v.bfloat16() if k in ("x", "context", "y") else v for k, v in feed.items()}
    velocity = ours(**narrow)
    assert velocity.dtype == torch.bfloat16
    reference = diffusers_velocity(theirs, **narrow)
    assert report("tiny bf16", velocity.float(), reference.float()) <= BF16_TOLERANCE


@pytest.mark.slow
@torch.no_grad()
def test_real_widths_match_diffusers_from_single_file(reference_dir, tmp_path):
    """FLUX.1 [dev]'s widths, one block of each kind, loaded by diffusers' own converter."""
    reference = f"{reference_dir}/flux-dev-d1"
    cfg = FluxConfig(depth=1, depth_single_blocks=1)
    with torch.device("meta"):
        ours = FluxTransformer(cfg)
    state = random_state(ours, seed=0)
    path = tmp_path / "flux1-dev-d1.safetensors"
    save_file(state, path)
    ours.load_state_dict(state, strict=True, assign=True)
    del state
    feed = inputs(cfg, batch=2, size=16, tokens=32, seed=1)
    start = time.perf_counter()
    velocity = ours(**feed)
    print(f"ours: {time.perf_counter() - start:.2f} s")
    del ours

    theirs = FluxTransformer2DModel.from_single_file(
        str(path),
        config=reference,
        subfolder="transformer",
        local_files_only=True,
        torch_dtype=torch.float32,
    ).eval()
    assert theirs.config.num_layers == 1 and theirs.config.guidance_embeds
    expected = diffusers_velocity(theirs, **feed)
    del theirs
    assert report("dev d1", velocity, expected) <= TOLERANCE


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_full_size_keys_and_counts(guidance_embed):
    """BFL's flux1-dev / flux1-schnell files: 780 / 776 tensors, and diffusers' converter
    consumes exactly our keys into exactly FluxTransformer2DModel's."""
    cfg = FluxConfig(guidance_embed=guidance_embed)
    with torch.device("meta"):
        ours = FluxTransformer(cfg)
        theirs = FluxTransformer2DModel(**flux_diffusers_config(cfg))
    state = ours.state_dict()
    assert not list(ours.buffers())
    assert len(state) == DEV_TENSORS - (0 if guidance_embed else 4)
    parameters = sum(t.numel() for t in state.values())
    assert parameters == DEV_PARAMETERS - (0 if guidance_embed else GUIDANCE_IN_PARAMETERS)
    assert any(k.startswith("guidance_in.") for k in state) == guidance_embed

    checkpoint = dict(state)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint  # every key consumed
    expected = {k: t.shape for k, t in theirs.state_dict().items()}
    assert {k: t.shape for k, t in converted.items()} == expected
    # the test's own mapping (for widths other than 3072) agrees with diffusers' converter
    assert {k: t.shape for k, t in flux_to_diffusers(state, cfg).items()} == expected


def test_guidance_is_required_exactly_for_dev():
    feed = inputs(TINY, batch=1, size=4, tokens=3, seed=0)
    dev = FluxTransformer(TINY)
    with pytest.raises(ValueError, match="guidance"):
        dev(**{**feed, "guidance": None})
    schnell = FluxTransformer(replace(TINY, guidance_embed=False))
    with pytest.raises(ValueError, match="guidance"):
        schnell(**feed)
