"""The flow models' text encoders against transformers' models and diffusers' encode_prompt.

Tiny random configurations hold the same weights on both sides; the tokenizers are the real
ones (../shared/reference: SD 1.5's CLIP tokenizer, SDXL's second one for CLIP-G, T5's
tokenizer.json), so every test that encodes prompts skips without that folder.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from ldm_cli.core.flow_config import (
    FLUX_CLIP_L,
    FLUX_DEV,
    SD3_CLIP_G,
    SD3_CLIP_L,
    SD35_MEDIUM,
    T5Config,
)
from ldm_cli.models.flow_text import FlowTextEncoders
from ldm_cli.models.t5_encoder import T5EncoderModel, kept_in_fp32

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from tests.flow_helpers import flow_tokenizers, reference_clip, reference_t5  # noqa: E402

T5_TOLERANCE = 1e-6
TOLERANCE = 1e-5
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "café au lait, naïve still life; Tokyo 東京 at night (35mm film)",
    "castle on a hill, " * 40,  # past 77 CLIP tokens and every T5 length used here
]

TINY_T5 = T5Config(d_model=96, d_kv=32, d_ff=96, num_layers=2, num_heads=2)
TINY_CLIP_L = replace(
    FLUX_CLIP_L, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
)
# The real SD3 CLIP-G config with tiny widths; pad id 0 is diffusers' "!" of tokenizer_2.
TINY_CLIP_G = replace(
    SD3_CLIP_G,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    projection_dim=40,
    pad_token_id=0,
)
TINY_FLUX = FLUX_DEV.with_(clip_l=TINY_CLIP_L, t5=TINY_T5)
TINY_SD3 = SD35_MEDIUM.with_(
    clip_l=replace(TINY_CLIP_L, clip_skip=2, projection_dim=24),  # as SD3_CLIP_L
    clip_g=TINY_CLIP_G,
    t5=TINY_T5,  # 96 wide: the 32 + 48 CLIP features are zero-padded by 16
)


@pytest.fixture(scope="module")
def tokenizers(reference_dir):
    return flow_tokenizers(reference_dir)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: norm weights near 1, biases small, matrices at unit fan-in."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        if "norm" in name and name.endswith("weight"):
            parameter.copy_(1.0 + 0.1 * noise)
        elif parameter.ndim == 1:
            parameter.copy_(0.1 * noise)
        else:
            parameter.copy_(noise / parameter.shape[-1] ** 0.5)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# -- T5 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_pair():
    ours = randomize_(T5EncoderModel(TINY_T5), seed=0)
    return ours, reference_t5(TINY_T5, ours.state_dict())


@torch.no_grad()
def test_t5_matches_transformers_fp32(t5_pair):
    ours, theirs = t5_pair
    # 300 tokens: relative distances past max_distance (128) reach the last buckets
    ids = torch.randint(0, TINY_T5.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    out = ours(ids)
    diff = max_diff(out, theirs(ids).last_hidden_state)
    print("t5 fp32", diff)
    assert out.shape == (2, 300, TINY_T5.d_model) and out.dtype == torch.float32
    assert diff <= T5_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_t5_matches_transformers_in_half_precision(t5_pair, dtype):
    ours, theirs = (copy.deepcopy(m) for m in t5_pair)
    ours.to_dtype(dtype)
    theirs.to(dtype)
    if (
        dtype == torch.float16
    ):  # what from_pretrained(torch_dtype=fp16) does (_keep_in_fp32_modules)
        for block in theirs.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
    fp32 = {k for k, v in ours.state_dict().items() if v.dtype == torch.float32}
    assert fp32 == ({k for k in fp32 if kept_in_fp32(k)} if dtype == torch.float16 else set())
    ids = torch.randint(0, TINY_T5.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    out = ours(ids)
    diff = max_diff(out, theirs(ids).last_hidden_state)
    print("t5", dtype, diff)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert diff <= 1e-2 * out.abs().max().item()


def test_t5_state_dict_is_the_t5xxl_file_layout():
    with torch.device("meta"):
        model = T5EncoderModel(T5Config())  # the real XXL widths
    keys = set(model.state_dict())
    expected = {"shared.weight", "encoder.final_layer_norm.weight"}
    expected.add("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    for n in range(24):
        block = f"encoder.block.{n}.layer"
        expected.update(f"{block}.0.SelfAttention.{p}.weight" for p in "qkvo")
        expected.update(f"{block}.1.DenseReluDense.{p}.weight" for p in ("wi_0", "wi_1", "wo"))
        expected.update(f"{block}.{i}.layer_norm.weight" for i in (0, 1))
    assert keys == expected
    assert not list(model.buffers())
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656  # t5-v1_1-xxl's encoder
    with torch.device("meta"):
        reference = transformers.T5EncoderModel(
            transformers.T5Config(
                d_model=4096,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        )
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert shapes.pop("encoder.embed_tokens.weight") == shapes["shared.weight"]
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}


@torch.no_grad()
def test_t5_loads_strictly_on_meta_with_or_without_the_tied_alias(t5_pair):
    ours, theirs = t5_pair
    ids = torch.arange(12).unsqueeze(0)
    for state in (ours.state_dict(), theirs.state_dict()):  # the latter holds embed_tokens too
        with torch.device("meta"):
            model = T5EncoderModel(TINY_T5)
        model.load_state_dict(state, strict=True, assign=True)
        assert not any(p.is_meta for p in model.parameters())
        assert torch.equal(model.eval()(ids), ours(ids))


# -- the encoders of a flow model -----------------------------------------------------------------


def randomized_encoders(cfg, seed: int = 0, **kwargs) -> FlowTextEncoders:
    return randomize_(FlowTextEncoders(cfg, **kwargs), seed)


def submodule_state(module: torch.nn.Module) -> dict:
    return dict(module.state_dict())


@torch.no_grad()
def test_encode_flux_matches_flux_pipeline(tokenizers):
    ours = randomized_encoders(TINY_FLUX)
    clip = reference_clip(TINY_CLIP_L, submodule_state(ours.clip_l.transformer))
    t5 = reference_t5(TINY_T5, submodule_state(ours.t5xxl.transformer))
    pipe = diffusers.FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=clip,
        tokenizer=tokenizers.clip,
        text_encoder_2=t5,
        tokenizer_2=tokenizers.t5,
        transformer=None,
    )
    for length in (16, 77):
        context, pooled = ours.encode_flux(PROMPTS, length)
        ref_context, ref_pooled, _ = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, device="cpu", max_sequence_length=length
        )
        diffs = {"context": max_diff(context, ref_context), "pooled": max_diff(pooled, ref_pooled)}
        print("flux", length, diffs)
        assert context.shape == (len(PROMPTS), length, TINY_T5.d_model)
        assert pooled.shape == (len(PROMPTS), TINY_CLIP_L.hidden_size)
        assert all(d <= TOLERANCE for d in diffs.values()), diffs


def sd3_pipeline(ours: FlowTextEncoders, tokenizers):
    cfg = ours.cfg
    t5 = None
    if ours.t5xxl is not None:
        t5 = reference_t5(cfg.t5, submodule_state(ours.t5xxl.transformer))
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=None,
        scheduler=None,
        vae=None,
        text_encoder=reference_clip(cfg.clip_l, submodule_state(ours.clip_l.transformer)),
        tokenizer=tokenizers.clip,
        text_encoder_2=reference_clip(cfg.clip_g, submodule_state(ours.clip_g.transformer)),
        tokenizer_2=tokenizers.clip_g,
        text_encoder_3=t5,
        tokenizer_3=tokenizers.t5 if t5 is not None else None,
    )
    # Without T5 the pipeline sizes its zeros from the transformer's joint_attention_dim.
    stub = SimpleNamespace(config=SimpleNamespace(joint_attention_dim=cfg.t5.d_model))
    object.__setattr__(pipe, "transformer", stub)
    return pipe


def assert_sd3_matches(ours: FlowTextEncoders, pipe, length: int) -> None:
    context, pooled = ours.encode_sd3(PROMPTS, length)
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(
        prompt=PROMPTS,
        prompt_2=None,
        prompt_3=None,
        device="cpu",
        do_classifier_free_guidance=False,
        max_sequence_length=length,
    )
    diffs = {"context": max_diff(context, ref_context), "pooled": max_diff(pooled, ref_pooled)}
    print("sd3", length, ours.t5xxl is not None, diffs)
    cfg = ours.cfg
    assert context.shape == (len(PROMPTS), 77 + length, cfg.t5.d_model)
    assert pooled.shape == (len(PROMPTS), cfg.clip_l.projection_dim + cfg.clip_g.projection_dim)
    clip_width = cfg.clip_l.hidden_size + cfg.clip_g.hidden_size
    assert (context[:, :77, clip_width:] == 0).all() and context[
        :, :77, :clip_width
    ].abs().max() > 0
    assert all(d <= TOLERANCE for d in diffs.values()), diffs


@torch.no_grad()
def test_encode_sd3_matches_sd3_pipeline(tokenizers):
    ours = randomized_encoders(TINY_SD3, seed=1)
    pipe = sd3_pipeline(ours, tokenizers)
    for length in (16, 77):
        assert_sd3_matches(ours, pipe, length)


@torch.no_grad()
def test_encode_sd3_without_t5_uses_zeros_like_the_pipeline(tokenizers):
    ours = randomized_encoders(TINY_SD3, seed=2, t5=None)
    assert ours.t5xxl is None and not any(k.startswith("t5xxl.") for k in ours.state_dict())
    assert_sd3_matches(ours, sd3_pipeline(ours, tokenizers), 24)
    context, _ = ours.encode_sd3(["a cat"], 24)
    assert (context[:, 77:] == 0).all()
    with pytest.raises(ValueError):
        ours.encode_flux(["a cat"], 24)


def test_sd3_clip_pad_ids_are_those_of_diffusers_tokenizers(tokenizers):
    """The shipped SD3 configs pad as SD3's hub tokenizers do: CLIP-L with the end token,
    CLIP-G with "!" (id 0; SDXL's tokenizer_2 is the same file)."""
    assert SD3_CLIP_L.pad_token_id == tokenizers.clip.pad_token_id == 49407
    assert SD3_CLIP_G.pad_token_id == tokenizers.clip_g.pad_token_id == 0


@torch.no_grad()
def test_builds_on_meta_and_loads_strictly_with_assign():
    for cfg, kwargs in ((TINY_FLUX, {}), (TINY_SD3, {}), (TINY_SD3, {"t5": None})):
        source = randomized_encoders(cfg, seed=3, **kwargs)
        with torch.device("meta"):
            target = FlowTextEncoders(cfg, **kwargs)
        assert not list(target.buffers())
        target.load_state_dict(source.state_dict(), strict=True, assign=True)
        assert not any(p.is_meta for p in target.parameters())
        target.eval()
        encode = "encode_flux" if cfg.clip_g is None else "encode_sd3"
        loaded = getattr(target, encode)(PROMPTS[:2], 8)
        expected = getattr(source, encode)(PROMPTS[:2], 8)
        assert all(torch.equal(a, b) for a, b in zip(loaded, expected, strict=True))


def full_size_keys(cfg, **kwargs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = FlowTextEncoders(cfg, **kwargs)
    assert not list(model.buffers())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def reference_shapes(prefix: str, model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_keys_are_those_of_the_all_in_one_files(reference_dir):
    import json

    def hub_clip(subdir: str, with_projection: bool) -> torch.nn.Module:
        path = os.path.join(reference_dir, subdir, "config.json")
        if not os.path.isfile(path):
            pytest.skip(f"{path} not present")
        with open(path) as f:
            config = transformers.CLIPTextConfig(**json.load(f))
        cls = (
            transformers.CLIPTextModelWithProjection
            if with_projection
            else transformers.CLIPTextModel
        )
        with torch.device("meta"):
            return cls(config)

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config())
    t5_shapes = reference_shapes("t5xxl.transformer.", t5)
    # transformers 5's CLIPTextModel has no text_model level; the files' keys do
    clip_l = reference_shapes(
        "clip_l.transformer.text_model.", hub_clip("sd15/text_encoder", False)
    )
    clip_l_projected = reference_shapes("clip_l.transformer.", hub_clip("sd15/text_encoder", True))
    clip_g = reference_shapes("clip_g.transformer.", hub_clip("sdxl-base/text_encoder_2", True))
    assert full_size_keys(FLUX_DEV) == clip_l | t5_shapes
    assert full_size_keys(SD35_MEDIUM) == clip_l_projected | clip_g | t5_shapes
    assert full_size_keys(SD35_MEDIUM, t5=None) == clip_l_projected | clip_g
    assert clip_g["clip_g.transformer.text_projection.weight"] == (1280, 1280)
