"""SDXL on seeded random weights, against the references.

* The conditioner (``conditioner.embedders.0/1``): CLIP ViT-L's penultimate layer against
  transformers' ``CLIPTextModel``, bigG's penultimate layer and pooled projection against
  open_clip's model and transformers' ``CLIPTextModelWithProjection`` (loaded through
  diffusers' SDXL conversion).
* Whole pipelines: diffusers' ``StableDiffusionXLPipeline`` (and the img2img refiner pipeline)
  loading the same tiny original-layout files with ``from_single_file``: prompt embeddings,
  ``add_time_ids`` (``_get_add_time_ids``), the U-Net with ``label_emb`` fed
  ``added_cond_kwargs``, Euler / Euler a latents, base + refiner (``denoising_end`` /
  ``denoising_start``), and ``guidance_rescale`` for eps and v models.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_cli.core.config import TINY_SDXL, TINY_SDXL_REFINER, TextConfig
from ldm_cli.models.sdxl_conditioner import Conditioner
from ldm_cli.pipeline.cfg_rescale import rescale_x0
from ldm_cli.pipeline.guidance import combine
from ldm_cli.pipeline.load import load
from ldm_cli.pipeline.request import Request
from ldm_cli.pipeline.tasks.refiner import attach_refiner
from ldm_cli.pipeline.tasks.sdxl import adm_vector, base_time_ids, refiner_time_ids
from ldm_cli.samplers.schedules import eps_to_x0, v_to_x0
from ldm_cli.testing import random_checkpoint, randomize_
from ldm_cli.text.tokenizer import get_tokenizer
from tests.reference_configs import (
    diffusers_unet_config,
    diffusers_vae_config,
    transformers_clip_config,
)

diffusers = pytest.importorskip("diffusers")
open_clip = pytest.importorskip("open_clip")

TOLERANCE = 1e-5
PROMPTS = ["a photograph of an astronaut riding a horse", "", "castle, " * 50]
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, ugly"
SEED = 1234
SIZE = 64
SIZE_EMBED_DIM = 8  # TINY_SDXL's width per micro-conditioning number (256 in the real model)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# -- the conditioner ------------------------------------------------------------------------


def transformers_state(prefix: str, state: dict, model) -> dict:
    """Our keys under `prefix` (`...transformer.text_model.`) as transformers names them."""
    out = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if hasattr(model, "text_model"):  # transformers < 5.6 nests the modules
        out = {f"text_model.{k}": v for k, v in out.items()}
    return out


def open_clip_tower(cfg: TextConfig, state: dict):
    """open_clip's CLIP holding this text tower, vision deleted (FrozenOpenCLIPEmbedder2's
    `model`), loaded with `state`."""
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
    model.load_state_dict(state, strict=True)
    return model.eval()


def sgm_open_clip_forward(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False, always_return_pooled): the
    input of the last block (no ln_final) and ln_final(last) pooled at the end token."""
    x = model.token_embedding(tokens) + model.positional_embedding
    if not model.transformer.batch_first:
        x = x.transpose(0, 1)
    blocks = model.transformer.resblocks
    penultimate = None
    for index, block in enumerate(blocks):
        if index == len(blocks) - 1:
            penultimate = x
        x = block(x, attn_mask=model.attn_mask)
    if not model.transformer.batch_first:
        x, penultimate = x.transpose(0, 1), penultimate.transpose(0, 1)
    last = model.ln_final(x)
    pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return penultimate, pooled


@pytest.fixture(scope="module")
def conditioner():
    return randomize_(Conditioner(TINY_SDXL.text_encoders), seed=3).eval()


def test_conditioner_keys_are_sgm_original():
    state = Conditioner(TINY_SDXL.text_encoders).state_dict()
    assert "embedders.0.transformer.text_model.final_layer_norm.weight" in state
    assert "embedders.1.model.text_projection" in state and "embedders.1.model.logit_scale" in state
    assert not any(k.startswith("embedders.0.model.") for k in state)


def test_clip_l_part_matches_transformers(conditioner):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = TINY_SDXL.text
    config = CLIPTextConfig(**transformers_clip_config(cfg), attn_implementation="sdpa")
    reference = CLIPTextModel(config).eval()
    state = conditioner.state_dict()
    converted = transformers_state("embedders.0.transformer.text_model.", state, reference)
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    tokens = get_tokenizer(49407)(PROMPTS)
    with torch.no_grad():
        expected = reference(tokens, output_hidden_states=True).hidden_states[-2]
        context, _ = conditioner.encode(PROMPTS)
    got = context[..., : cfg.hidden_size]
    assert 0.1 < expected.std() < 10
    diff = (got - expected).abs().max().item()
    print(f"CLIP-L penultimate vs transformers: {diff:.3g}")
    assert diff <= TOLERANCE


def test_bigg_part_matches_open_clip_and_transformers(conditioner):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = TINY_SDXL.text2
    state = conditioner.state_dict()
    tower = {k.removeprefix("embedders.1.model."): v for k, v in state.items() if ".1.model." in k}
    tokens = get_tokenizer(0)(PROMPTS)
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS))  # pad 0, as open_clip

    reference = open_clip_tower(cfg, tower)
    config = CLIPTextConfig(
        **{**transformers_clip_config(cfg), "projection_dim": cfg.projection_dim},
        attn_implementation="sdpa",
    )
    with_projection = CLIPTextModelWithProjection(config).eval()
    checkpoint = {f"conditioner.embedders.1.model.{k}": v for k, v in tower.items()}
    converted = convert_open_clip_checkpoint(
        with_projection, checkpoint, prefix="conditioner.embedders.1.model."
    )
    missing, unexpected = with_projection.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)

    with torch.no_grad():
        context, pooled = conditioner.encode(PROMPTS)
        sgm_hidden, sgm_pooled = sgm_open_clip_forward(reference, tokens)
        hf = with_projection(tokens, output_hidden_states=True)
    got = context[..., TINY_SDXL.text.hidden_size :]
    assert context.shape == (3, 77, 192) and pooled.shape == (3, 96)
    diffs = {
        "hidden vs open_clip": (got - sgm_hidden).abs().max().item(),
        "pooled vs open_clip": (pooled - sgm_pooled).abs().max().item(),
        "pooled vs open_clip encode_text": (pooled - reference.encode_text(tokens))
        .abs()
        .max()
        .item(),
        "hidden vs transformers": (got - hf.hidden_states[-2]).abs().max().item(),
        "pooled vs transformers": (pooled - hf.text_embeds).abs().max().item(),
    }
    print(", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOLERANCE


def test_clip_skip_reads_deeper_layers_without_final_norm():
    texts = tuple(replace(t, clip_skip=3) for t in TINY_SDXL.text_encoders)
    deeper = randomize_(Conditioner(texts), seed=3).eval()
    tokens = get_tokenizer(49407)(PROMPTS[:1])
    with torch.no_grad():
        context, pooled = deeper(tokens)  # one tensor, re-padded for each tower
        clip = deeper.embedders[0].text_model(tokens, output_hidden_states=True)
        _, default_pooled = randomize_(Conditioner(TINY_SDXL.text_encoders), seed=3).eval()(tokens)
    torch.testing.assert_close(context[..., :64], clip.hidden_states[-3], rtol=0, atol=0)
    torch.testing.assert_close(pooled, default_pooled, rtol=0, atol=0)  # always the last layer


# -- whole pipelines against diffusers --------------------------------------------------------


def write_config_dir(root: Path, reference_dir: str, refiner: bool) -> Path:
    """The diffusers folder layout `from_single_file(config=...)` reads for the tiny models."""
    cfg = TINY_SDXL_REFINER if refiner else TINY_SDXL
    bigg = cfg.text_encoders[-1]
    folders = {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            **diffusers_unet_config(cfg.unet, SIZE_EMBED_DIM),
        },
        "vae": {"_class_name": "AutoencoderKL", **diffusers_vae_config(cfg.vae)},
        "text_encoder_2": {
            **transformers_clip_config(bigg),
            "architectures": ["CLIPTextModelWithProjection"],
            "projection_dim": bigg.projection_dim,
        },
    }
    if not refiner:
        folders["text_encoder"] = transformers_clip_config(cfg.text)
    for name, config in folders.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    ref = Path(reference_dir) / "sdxl-base"
    for name in (
        ("tokenizer_2", "scheduler") if refiner else ("tokenizer", "tokenizer_2", "scheduler")
    ):
        shutil.copytree(ref / name, root / name)
    index = json.loads((ref / "model_index.json").read_text())
    if refiner:  # stable-diffusion-xl-refiner-1.0's model_index.json
        index.update(
            _class_name="StableDiffusionXLImg2ImgPipeline",
            force_zeros_for_empty_prompt=False,
            requires_aesthetics_score=True,
            text_encoder=[None, None],
            tokenizer=[None, None],
        )
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {
        "base": random_checkpoint(TINY_SDXL, root / "tiny-sdxl.safetensors", seed=21),
        "refiner": random_checkpoint(
            TINY_SDXL_REFINER, root / "tiny-sdxl-refiner.safetensors", seed=22
        ),
    }


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory, reference_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pipes = {}
    for name, cls in (
        ("base", StableDiffusionXLPipeline),
        ("refiner", StableDiffusionXLImg2ImgPipeline),
    ):
        refiner = name == "refiner"
        config_dir = write_config_dir(
            tmp_path_factory.mktemp(f"config-{name}"), reference_dir, refiner
        )
        extra = {"text_encoder": None, "tokenizer": None} if refiner else {}
        pipe = cls.from_single_file(
            str(files[name]),
            config=str(config_dir),
            local_files_only=True,
            torch_dtype=torch.float32,
            **extra,
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.original_scheduler_config = dict(pipe.scheduler.config)
        pipes[name] = pipe
    return pipes


@pytest.fixture(scope="module")
def ours(files):
    return load(files["base"], device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def our_refiner(files):
    return load(files["refiner"], device="cpu", dtype="fp32")


def use_scheduler(pipe, name: str, **kwargs) -> None:
    cls = getattr(diffusers, name)
    pipe.scheduler = cls.from_config(
        pipe.original_scheduler_config, timestep_spacing="linspace", **kwargs
    )


def test_reference_converted_our_files(ours, our_refiner, reference):
    """diffusers' single-file loader read our original-layout files (not e.g. random init)."""
    assert torch.equal(
        ours.model.unet.label_emb[0][0].weight, reference["base"].unet.add_embedding.linear_1.weight
    )
    assert torch.equal(
        our_refiner.model.unet.label_emb[0][2].weight,
        reference["refiner"].unet.add_embedding.linear_2.weight,
    )
    for tokenizer, pad in (
        (reference["base"].tokenizer, 49407),
        (reference["base"].tokenizer_2, 0),
    ):
        ids = tokenizer(
            PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        assert torch.equal(get_tokenizer(pad)(PROMPTS), ids.input_ids)


def test_prompt_embeddings_match_diffusers(ours, reference):
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = reference["base"].encode_prompt(
            PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
        )
    context, our_pooled = ours.encode_text([PROMPT, NEGATIVE])
    diffs = [
        (context[:1] - embeds).abs().max().item(),
        (context[1:] - negative).abs().max().item(),
        (our_pooled[:1] - pooled).abs().max().item(),
        (our_pooled[1:] - negative_pooled).abs().max().item(),
    ]
    print(f"prompt embeddings vs diffusers: {max(diffs):.3g}")
    assert max(diffs) <= TOLERANCE


@pytest.mark.parametrize(
    "width, height, crop", [(64, 64, (0, 0)), (1024, 768, (0, 0)), (832, 1216, (16, 8))]
)
def test_time_ids_are_diffusers_add_time_ids(reference, width, height, crop):
    base = reference["base"]
    expected = base._get_add_time_ids(
        (height, width), crop, (height, width), torch.float32, text_encoder_projection_dim=96
    )
    assert torch.equal(torch.tensor([base_time_ids(width, height, crop_top_left=crop)]), expected)
    positive, negative = reference["refiner"]._get_add_time_ids(
        (height, width), crop, (height, width), 6.0, 2.5, (height, width), crop, (height, width),
        torch.float32, text_encoder_projection_dim=96,
    )  # fmt: skip
    assert torch.equal(
        torch.tensor([refiner_time_ids(width, height, 6.0, crop_top_left=crop)]), positive
    )
    assert torch.equal(
        torch.tensor([refiner_time_ids(width, height, 2.5, crop_top_left=crop)]), negative
    )


def test_unet_with_label_emb_matches_diffusers(ours, reference):
    """Our U-Net fed y = adm_vector(pooled, time ids) equals diffusers' fed added_cond_kwargs
    with the add_time_ids its pipeline builds, on weights diffusers converted from our file."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 24, generator=gen)
    timesteps = torch.tensor([999.0, 321.5])
    context = torch.randn(2, 77, TINY_SDXL.unet.context_dim, generator=gen)
    pooled = torch.randn(2, 96, generator=gen)
    time_ids = torch.cat(
        [
            reference["base"]._get_add_time_ids((48, 32), (0, 0), (48, 32), torch.float32, 96),
            reference["base"]._get_add_time_ids(
                (1024, 768), (16, 8), (512, 512), torch.float32, 96
            ),
        ]
    )
    y = adm_vector(pooled, time_ids, SIZE_EMBED_DIM)
    with torch.no_grad():
        got = ours.model.unet(x, timesteps, context, y)
        expected = reference["base"].unet(
            x, timesteps, encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample  # fmt: skip
        other_sizes = ours.model.unet(x, timesteps, context, y.flip(0))
    assert got.std() > 0.01 and (other_sizes - got).abs().max() > 1e-3  # y matters
    diff = (got - expected).abs().max().item()
    print(f"SDXL U-Net with label_emb vs diffusers: {diff:.3g} (output std {got.std():.3g})")
    assert diff <= TOLERANCE


def our_latents(pipe, sampler: str, steps: int, cfg: float = 5.0, rescale: float = 0.0):
    req = Request(PROMPT, NEGATIVE, steps, cfg, SEED, sampler, "normal", SIZE, SIZE, rescale)
    cond, uncond = pipe.conditioning([req])
    noise, gen = pipe.initial_noise(req.seed, req.width, req.height)
    return pipe.sample(cond, uncond, noise, [gen], req)


def reference_latents(pipe, steps: int, cfg: float = 5.0, **kwargs):
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=cfg,
        height=SIZE,
        width=SIZE,
        generator=kwargs.pop("generator", None) or torch.Generator("cpu").manual_seed(SEED),
        output_type="latent",
        **kwargs,
    )
    return out.images


def assert_close_latents(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    print(f"{what}: max abs diff {diff:.3g} (std {theirs.std():.3g})")
    assert theirs.std() > 0.1 and diff <= 1e-4


@pytest.mark.parametrize(
    "sampler, scheduler",
    [("euler", "EulerDiscreteScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler")],
)
def test_base_latents_match_diffusers(ours, reference, sampler, scheduler):
    use_scheduler(reference["base"], scheduler)
    expected = reference_latents(reference["base"], steps=6)
    assert_close_latents(our_latents(ours, sampler, 6), expected, f"SDXL base, {sampler}")


def test_base_image_matches_diffusers(ours, reference):
    use_scheduler(reference["base"], "EulerDiscreteScheduler")
    out = reference["base"](
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, height=SIZE,
        width=SIZE, generator=torch.Generator().manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    expected = (out * 255).round().astype(np.uint8)
    (image,) = ours.generate(PROMPT, NEGATIVE, steps=4, cfg=5.0, seed=SEED, sampler="euler",
                             scheduler="normal", width=SIZE, height=SIZE)  # fmt: skip
    diff = np.abs(np.asarray(image).astype(int) - expected.astype(int))
    assert diff.max() <= 2 and expected.std() > 5  # the VAE decodes at 1 / 0.13025


@pytest.mark.parametrize("switch", [0.8, 0.5])
def test_base_plus_refiner_matches_diffusers(ours, our_refiner, reference, switch):
    """One sampler run handing over at the switch = diffusers' base with denoising_end
    followed by its img2img refiner with denoising_start, sharing one generator."""
    for pipe in reference.values():
        use_scheduler(pipe, "EulerAncestralDiscreteScheduler")
    gen = torch.Generator("cpu").manual_seed(SEED)
    latents = reference_latents(reference["base"], steps=10, denoising_end=switch, generator=gen)
    expected = reference["refiner"](
        PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=10,
        denoising_start=switch, guidance_scale=5.0, generator=gen, output_type="latent",
    ).images  # fmt: skip
    attach_refiner(ours, our_refiner, switch)
    try:
        got = our_latents(ours, "euler_a", 10)
    finally:
        ours.refiner = None
    assert_close_latents(got, expected, f"SDXL base + refiner at {switch}")
    alone = our_latents(ours, "euler_a", 10)
    assert (alone - got).abs().max() > 1e-2  # the refiner did take part


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_rescale_cfg_matches_diffusers_guidance_rescale(files, reference, prediction):
    pipe = load(files["base"], device="cpu", dtype="fp32", prediction=prediction)
    name = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    use_scheduler(reference["base"], "EulerDiscreteScheduler", prediction_type=name)
    expected = reference_latents(reference["base"], steps=5, cfg=9.0, guidance_rescale=0.7)
    got = our_latents(pipe, "euler", 5, cfg=9.0, rescale=0.7)
    assert_close_latents(got, expected, f"guidance rescale 0.7, {prediction}")
    plain = our_latents(pipe, "euler", 5, cfg=9.0)
    assert (plain - got).abs().max() > 1e-3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_rescale_x0_is_rescale_noise_cfg_on_the_network_output(prediction):
    """On x0 predictions, rescale_x0 is diffusers' rescale_noise_cfg applied to eps or v."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        rescale_noise_cfg,
    )

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64) * 5
    sigma = torch.tensor([14.6, 3.2, 0.4], dtype=torch.float64)
    out_uncond, out_cond = (
        torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in "uc"
    )
    to_x0 = eps_to_x0 if prediction == "eps" else v_to_x0
    scale, phi = 7.5, 0.7
    expected = to_x0(
        x, rescale_noise_cfg(out_uncond + scale * (out_cond - out_uncond), out_cond, phi), sigma
    )
    x0_uncond, x0_cond = to_x0(x, out_uncond, sigma), to_x0(x, out_cond, sigma)
    guided = combine(x0_uncond, [x0_cond], [[1.0] * 3], scale)
    got = rescale_x0(guided, x0_cond, x, sigma, phi, prediction)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    assert rescale_x0(guided, x0_cond, x, sigma, 0.0, prediction) is guided
