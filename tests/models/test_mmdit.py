"""The original-layout MMDiT against diffusers' SD3Transformer2DModel.

Our random weights are saved as a single file with the released files' ``model.diffusion_model.``
keys and loaded by diffusers' ``from_single_file``, whose conversion (q/k/v split, shift/scale
swaps of the final norms) must accept them, so parity also proves the key layout.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldm_cli.checkpoints.detect.flow import mmdit_config
from ldm_cli.checkpoints.header import CheckpointHeader, TensorInfo
from ldm_cli.core.errors import UserError
from ldm_cli.core.flow_config import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiTConfig
from ldm_cli.models.mmdit import MMDiT, mmdit_param_count

diffusers = pytest.importorskip("diffusers")
from accelerate import init_empty_weights  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_sd3_transformer_checkpoint_to_diffusers,
)

from tests.flow_helpers import (  # noqa: E402
    TRANSFORMER_PREFIX,
    sd3_diffusers_config,
    sd3_reference,
)

PARITY_ATOL = 1e-5

TINY_SD3_MEDIUM = MMDiTConfig(depth=3, hidden_size=128, num_heads=2, pos_embed_max_size=16)
TINY_SD35_MEDIUM = replace(TINY_SD3_MEDIUM, qk_norm=True, x_block_self_attn_layers=(0, 1))
TINY_CONFIGS = {"sd3-medium": TINY_SD3_MEDIUM, "sd35-medium": TINY_SD35_MEDIUM}
# SD 3.5 Medium's real widths (and 384x384 position table), 3 of its 24 blocks
SD35_MEDIUM_3_BLOCKS = replace(SD35_MEDIUM.transformer, depth=3, x_block_self_attn_layers=(0, 1))

FULL_SIZE = {
    "sd35-medium": SD35_MEDIUM.transformer,
    "sd35-large": SD35_LARGE.transformer,
    "sd3-medium": SD3_MEDIUM.transformer,
}
# stored pos_embed included (diffusers keeps it as a buffer)
FULL_SIZE_PARAMS = {
    "sd35-medium": 2_469_663_936,
    "sd35-large": 8_146_280_768,
    "sd3-medium": 2_084_951_104,
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def random_state(cfg: MMDiTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Fan-in scaled weights (0.026 at SD 3.5 Medium's width), q/k norm scales around 1, small
    biases, an O(1) position table: O(1) activations, so the tolerance means something."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MMDiT(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key == "pos_embed":
            state[key] = noise * 0.5
        elif len(shape) >= 2:
            state[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif ".ln_" in key:
            state[key] = 1 + 0.1 * noise
        else:
            state[key] = 0.02 * noise
    return state


def build(cfg: MMDiTConfig, state: dict[str, torch.Tensor]) -> MMDiT:
    with torch.device("meta"):
        model = MMDiT(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def inputs(cfg: MMDiTConfig, height: int, width: int, tokens: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, height, width, generator=gen)
    sigma = torch.tensor([0.93, 0.25])
    context = torch.randn(2, tokens, cfg.context_in_dim, generator=gen)
    y = torch.randn(2, cfg.adm_in_channels, generator=gen)
    return x, sigma, context, y


def max_diff_to_diffusers(cfg, tmp_path, height, width, tokens) -> float:
    model = build(cfg, random_state(cfg, seed=0))
    reference = sd3_reference(cfg, model.state_dict(), tmp_path)
    x, sigma, context, y = inputs(cfg, height, width, tokens)
    with torch.no_grad():
        ours = model(x, sigma, context, y)
        # as StableDiffusion3Pipeline calls it: timestep = scheduler sigma * 1000
        theirs = reference(
            hidden_states=x,
            encoder_hidden_states=context,
            pooled_projections=y,
            timestep=sigma * 1000,
            return_dict=False,
        )[0]
    assert ours.shape == theirs.shape == x.shape
    assert 0.1 < ours.std() < 10
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_matches_diffusers(name, tmp_path):
    start = time.perf_counter()
    # 6x10 patches: an off-centre crop of the 16x16 position table
    diff = max_diff_to_diffusers(TINY_CONFIGS[name], tmp_path, 12, 20, tokens=10)
    print(f"{name}: max abs diff {diff:.3g} ({time.perf_counter() - start:.1f} s)")
    assert diff <= PARITY_ATOL


@pytest.mark.slow
def test_sd35_medium_widths_match_diffusers(tmp_path):
    start = time.perf_counter()
    diff = max_diff_to_diffusers(SD35_MEDIUM_3_BLOCKS, tmp_path, 16, 24, tokens=12)
    print(f"sd35-medium widths: max abs diff {diff:.3g} ({time.perf_counter() - start:.1f} s)")
    assert diff <= PARITY_ATOL


def test_sigma_forms_agree():
    cfg = TINY_SD35_MEDIUM
    model = build(cfg, random_state(cfg, seed=0))
    x, _, context, y = inputs(cfg, 8, 8, tokens=5)
    with torch.no_grad():
        per_sample = model(x, torch.tensor([0.5, 0.5]), context, y)
        scalar = model(x, torch.tensor(0.5), context, y)
        as_double = model(x, torch.tensor([0.5, 0.5], dtype=torch.float64), context, y)
    torch.testing.assert_close(scalar, per_sample, rtol=0, atol=0)
    torch.testing.assert_close(as_double, per_sample, rtol=0, atol=0)


def test_bfloat16_weights_run_close_to_float32():
    cfg = TINY_SD35_MEDIUM
    state = random_state(cfg, seed=0)
    model = build(cfg, state)
    x, sigma, context, y = inputs(cfg, 12, 20, tokens=10)
    with torch.no_grad():
        expected = model(x, sigma, context, y)
        got = build(cfg, {k: v.bfloat16() for k, v in state.items()})(x, sigma, context, y)
        got_bf16 = model.to(torch.bfloat16)(x.bfloat16(), sigma, context, y)
    assert got.dtype == torch.float32  # the output comes back in the input's dtype
    assert got_bf16.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 0.05 * scale
    assert (got_bf16.float() - expected).abs().max().item() < 0.05 * scale


def test_crop_is_centred_and_checked():
    cfg = TINY_SD3_MEDIUM
    model = build(cfg, random_state(cfg, seed=0))
    grid = model.pos_embed.reshape(16, 16, -1)
    torch.testing.assert_close(
        model.cropped_pos_embed(6, 10), grid[5:11, 3:13].reshape(1, 60, -1), rtol=0, atol=0
    )
    x, sigma, context, y = inputs(cfg, 34, 8, tokens=3)
    with pytest.raises(ValueError, match="exceeds"):
        model(x, sigma, context, y)
    with pytest.raises(ValueError, match="multiple of the patch"):
        model(x[..., :7], sigma, context, y)


def header_of(shapes: dict[str, tuple[int, ...]]) -> CheckpointHeader:
    """A file's header holding these transformer tensors (under model.diffusion_model.)."""
    tensors = {TRANSFORMER_PREFIX + k: TensorInfo("F32", shape) for k, shape in shapes.items()}
    return CheckpointHeader(Path("sd3.safetensors"), tensors, {})


def test_detection_names_a_missing_tensor():
    with pytest.raises(UserError, match="x_embedder.proj.weight"):
        mmdit_config(header_of({"time_embed.0.weight": (1280, 320)}))


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_layout(name):
    """The config reads back from the state-dict shapes, diffusers' conversion takes every key
    and yields exactly its model's state dict, and the parameter counts agree."""
    cfg = FULL_SIZE[name]
    with torch.device("meta"):
        model = MMDiT(cfg)
    state = model.state_dict()
    assert mmdit_config(header_of({k: tuple(v.shape) for k, v in state.items()})) == cfg

    checkpoint = {TRANSFORMER_PREFIX + k: v for k, v in state.items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}  # the conversion popped every key
    with init_empty_weights(include_buffers=True):
        reference = SD3Transformer2DModel.from_config(sd3_diffusers_config(cfg))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected

    ours = mmdit_param_count(cfg)
    theirs = sum(p.numel() for p in reference.parameters())
    pos_embed = reference.pos_embed.pos_embed.numel()
    print(f"{name}: {ours:,} ({ours - pos_embed:,} without pos_embed); diffusers {theirs:,}")
    assert ours == theirs + pos_embed == FULL_SIZE_PARAMS[name]
