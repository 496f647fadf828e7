"""SD 2.x on seeded random weights: the OpenCLIP text tower against open_clip's model (and
diffusers' SD 2 text-encoder conversion), the linear-projection 64-dim-head U-Net against
diffusers', and v-prediction sampling against diffusers' Euler scheduler."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ldm_cli.core.config import OPENCLIP_H_TEXT, TINY_SD2, TextConfig
from ldm_cli.models.openclip_text import OpenCLIPTextEncoder
from ldm_cli.pipeline.load import load
from ldm_cli.pipeline.request import Request
from ldm_cli.testing import random_checkpoint, randomize_
from ldm_cli.text.tokenizer import OPENCLIP_PAD_ID, get_tokenizer
from tests.models.test_unet_parity import build_tiny, tiny_inputs, to_diffusers
from tests.reference_configs import diffusers_unet_config

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("diffusers")

TOLERANCE = 1e-5
PROMPTS = ["a photograph of an astronaut riding a horse", "", "castle, " * 50]
# Several heads and a projection narrower than the width, so no shape coincidence hides a bug.
TINY_TEXT = replace(
    OPENCLIP_H_TEXT,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    projection_dim=48,
)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def open_clip_text_model(cfg: TextConfig, seed: int = 0):
    """open_clip's CLIP of this text tower with the vision tower deleted, exactly what SD 2's
    FrozenOpenCLIPEmbedder holds as ``model``, with seeded random weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    text_cfg = CLIPTextCfg(
        context_length=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        width=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        layers=cfg.num_hidden_layers,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
    )
    vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    model = CLIP(cfg.projection_dim, vision_cfg, text_cfg)
    del model.visual
    return randomize_(model, seed).eval()


def ours_from(reference, cfg: TextConfig) -> OpenCLIPTextEncoder:
    encoder = OpenCLIPTextEncoder(cfg).eval()
    encoder.model.load_state_dict(reference.state_dict(), strict=True)
    return encoder


def reference_features(model, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder.encode_with_transformer: the first `blocks` blocks, ln_final."""
    x = model.token_embedding(tokens) + model.positional_embedding
    if not model.transformer.batch_first:
        x = x.transpose(0, 1)
    for block in model.transformer.resblocks[:blocks]:
        x = block(x, attn_mask=model.attn_mask)
    if not model.transformer.batch_first:
        x = x.transpose(0, 1)
    return model.ln_final(x)


def test_state_dict_is_open_clips():
    reference = open_clip_text_model(TINY_TEXT)
    ours = OpenCLIPTextEncoder(TINY_TEXT).model
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert "logit_scale" in theirs and "text_projection" in theirs


def test_tokens_match_open_clip():
    ours = get_tokenizer(OPENCLIP_PAD_ID)(PROMPTS)
    assert torch.equal(ours, open_clip.tokenize(PROMPTS))


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_text_tower_matches_open_clip(clip_skip):
    reference = open_clip_text_model(TINY_TEXT, seed=clip_skip)
    ours = ours_from(reference, replace(TINY_TEXT, clip_skip=clip_skip))
    tokens = get_tokenizer(OPENCLIP_PAD_ID)(PROMPTS)
    with torch.no_grad():
        context, pooled = ours.forward_with_pooled(tokens)
        blocks = TINY_TEXT.num_hidden_layers - clip_skip + 1
        expected = reference_features(reference, tokens, blocks)
        expected_pooled = reference.encode_text(tokens)
        alone = ours(tokens)
    assert context.shape == (3, 77, 64) and pooled.shape == (3, 48)
    assert 0.1 < expected.std() < 10
    diff = (context - expected).abs().max().item()
    pooled_diff = (pooled - expected_pooled).abs().max().item()
    print(f"clip_skip {clip_skip}: context {diff:.3g}, pooled {pooled_diff:.3g}")
    assert diff <= TOLERANCE and pooled_diff <= TOLERANCE
    assert torch.equal(alone, context)  # the early stop gives the same features


def test_penultimate_matches_diffusers_sd2_text_encoder():
    """diffusers' SD 2 text encoder is a CLIPTextModel of one layer less (the file's last block
    is dropped on conversion); its last_hidden_state is SD 2's conditioning."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = TINY_TEXT
    reference = open_clip_text_model(cfg, seed=7)
    ours = ours_from(reference, cfg)
    prefix = "cond_stage_model.model."
    last = f"transformer.resblocks.{cfg.num_hidden_layers - 1}."
    checkpoint = {prefix + k: v for k, v in reference.state_dict().items() if last not in k}
    config = CLIPTextConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers - 1,
        num_attention_heads=cfg.num_attention_heads,
        hidden_act="gelu",
        attn_implementation="sdpa",
    )
    text_model = CLIPTextModel(config).eval()
    converted = convert_open_clip_checkpoint(text_model, checkpoint, prefix=prefix)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    if hasattr(text_model, "text_model"):  # transformers < 5.6 nests the modules
        converted = {f"text_model.{k}": v for k, v in converted.items()}
    text_model.load_state_dict(converted, strict=True)
    tokens = get_tokenizer(OPENCLIP_PAD_ID)(PROMPTS)
    with torch.no_grad():
        expected = text_model(tokens).last_hidden_state
        got = ours(tokens)
    diff = (got - expected).abs().max().item()
    print(f"penultimate vs diffusers' conversion: {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("heads", [64, 16])
def test_unet_matches_diffusers(heads):
    cfg = replace(TINY_SD2.unet, num_head_channels=heads)
    model = build_tiny(cfg, seed=heads)
    reference = to_diffusers(model, diffusers_unet_config(cfg))
    assert reference.config.use_linear_projection
    assert type(reference.down_blocks[0].attentions[0].proj_in) is torch.nn.Linear
    x, timesteps, context = tiny_inputs(cfg)
    with torch.no_grad():
        ours = model(x, timesteps, context)
        theirs = reference(x, timesteps, encoder_hidden_states=context).sample
    assert 0.1 < ours.std() < 10
    diff = (ours - theirs).abs().max().item()
    print(f"SD2 U-Net, {heads}-dim heads: max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.fixture(scope="module")
def tiny_v_pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors"
    return load(random_checkpoint(TINY_SD2, path, seed=5), device="cpu", dtype="fp32")


def test_v_prediction_sampling_matches_diffusers(tiny_v_pipe):
    """Euler on a v-prediction model: our sigma-space denoiser (v -> x0) and diffusers'
    EulerDiscreteScheduler(prediction_type="v_prediction") give the same latents."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_v_pipe
    assert pipe.config.prediction == "v"
    req = Request("a red circle", "blurry", steps=4, cfg=5.0, seed=3, sampler="euler",
                  scheduler="normal", width=64, height=64)  # fmt: skip
    cond, uncond = pipe.conditioning([req])
    noise, gen = pipe.initial_noise(req.seed, req.width, req.height)
    ours = pipe.sample(cond, uncond, noise, [gen], req)

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="linspace",
    )
    scheduler.set_timesteps(req.steps)
    unet = to_diffusers(pipe.unet, diffusers_unet_config(TINY_SD2.unet))
    # plain prompts: the conditioning is the text encoder's output as it is
    context = pipe.encode_prompts([req.negative_prompt, req.prompt])
    latents = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            out = unet(model_input, t, encoder_hidden_states=context).sample
            out_uncond, out_cond = out.chunk(2)
            v = out_uncond + req.cfg * (out_cond - out_uncond)
            latents = scheduler.step(v, t, latents).prev_sample
    assert latents.std() > 0.1
    diff = (ours - latents).abs().max().item()
    print(f"v-prediction Euler, 4 steps: max abs latent diff {diff:.3g}")
    assert diff <= 1e-4


def test_v_and_eps_readings_differ(tiny_v_pipe, tmp_path):
    """The prediction type reaches the sampler: the same weights read as eps give another image."""
    path = tiny_v_pipe.path
    as_eps = load(path, device="cpu", dtype="fp32", prediction="eps")
    assert as_eps.config.prediction == "eps"
    kwargs = dict(steps=2, seed=1, width=64, height=64)
    (v_image,) = tiny_v_pipe.generate("a cat", **kwargs)
    (eps_image,) = as_eps.generate("a cat", **kwargs)
    assert v_image.tobytes() != eps_image.tobytes()
