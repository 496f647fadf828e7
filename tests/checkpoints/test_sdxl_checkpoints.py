"""SDXL files: full-size shapes from the real configurations (meta device, no data), detection
from tensor shapes, the refiner hand-over, and `ldm info` / `ldm generate` on tiny
original-layout checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.checkpoints.detect import FAMILY_NAMES, config_from_json, config_to_json, detect_config
from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.prediction import with_clip_skip
from ldm_cli.checkpoints.save import save_checkpoint
from ldm_cli.core.config import (
    SDXL_BASE,
    SDXL_INPAINT,
    SDXL_REFINER,
    TINY_SDXL,
    TINY_SDXL_REFINER,
    ModelConfig,
)
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.models.loading import build_empty, check_keys
from ldm_cli.models.sdxl_conditioner import repad
from ldm_cli.models.unet import unet_param_count
from ldm_cli.pipeline.load import load
from ldm_cli.pipeline.request import Request
from ldm_cli.pipeline.tasks.handover import Refiner
from ldm_cli.pipeline.tasks.refiner import attach_refiner, refiner_step_count
from ldm_cli.pipeline.tasks.sdxl import SDXLPipeline
from ldm_cli.testing import randomize_, training_extras
from tests.checkpoints.test_sd2_checkpoints import parameters, shapes_header
from tests.cli_helpers import ldm, pixels, written

SDXL_UNET_PARAMETERS = 2_567_463_684
OPENCLIP_BIGG_PARAMETERS = 694_659_841  # all 32 blocks, text_projection and logit_scale
CLIP_L_PARAMETERS = 123_060_480
SD_VAE_PARAMETERS = 83_653_863

# stable-diffusion-xl-refiner-1.0/unet/config.json (not in ../shared/reference)
REFINER_UNET_DIFFUSERS = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "in_channels": 4,
    "layers_per_block": 2,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2560,
    "sample_size": 128,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# -- full size, on the meta device --------------------------------------------------------


@pytest.mark.parametrize("cfg", [SDXL_BASE, SDXL_INPAINT], ids=["sdxl", "sdxl-inpaint"])
def test_full_size_parameter_counts(cfg):
    model = build_empty(cfg)
    inpaint_extra = 5 * 320 * 3 * 3 if cfg.unet.in_channels == 9 else 0  # conv_in's 5 channels
    clip_l, bigg = model.conditioner.embedders
    assert parameters(model.unet) == SDXL_UNET_PARAMETERS + inpaint_extra
    assert parameters(bigg) == OPENCLIP_BIGG_PARAMETERS
    assert parameters(clip_l) == CLIP_L_PARAMETERS
    assert parameters(model.vae) == SD_VAE_PARAMETERS
    assert model.conditioner.context_dim == 2048 and model.conditioner.pooled_dim == 1280


def test_full_size_root_keys_are_the_original_ones():
    keys = build_empty(SDXL_BASE).state_dict().keys()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "model.diffusion_model.label_emb.0.2.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys


def test_full_size_bigg_keys_are_open_clips():
    """The original file stores open_clip's ViT-bigG-14 CLIP less its vision tower."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    with torch.device("meta"):
        reference = CLIP(**open_clip.get_model_config("ViT-bigG-14"))
    del reference.visual
    expected = {
        f"conditioner.embedders.1.model.{k}": v.shape for k, v in reference.state_dict().items()
    }
    ours = {k: v.shape for k, v in build_empty(SDXL_BASE).state_dict().items()}
    assert {k: v for k, v in ours.items() if k.startswith("conditioner.embedders.1.")} == expected
    refiner = {k: v.shape for k, v in build_empty(SDXL_REFINER).state_dict().items()}
    bigg = {k.replace(".1.", ".0.", 1): v for k, v in expected.items()}
    assert {k: v for k, v in refiner.items() if k.startswith("conditioner.")} == bigg


def test_full_size_unet_is_the_parity_tested_one():
    from tests.models.test_unet_parity import (
        SDXL_BASE_UNET,  # keys checked against diffusers' config
    )

    assert SDXL_BASE.unet == SDXL_BASE_UNET


def test_refiner_unet_matches_diffusers_refiner_config():
    accelerate = pytest.importorskip("accelerate")
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with accelerate.init_empty_weights():
        reference = UNet2DConditionModel.from_config(REFINER_UNET_DIFFUSERS)
    with torch.device("meta"):
        ours = LatentDiffusion(SDXL_REFINER).unet
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(reference.config))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    count = unet_param_count(SDXL_REFINER.unet)
    print(f"SDXL refiner U-Net: {count:,} parameters")
    assert count == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize(
    "cfg, extra, expected",
    [
        (SDXL_BASE, (), SDXL_BASE),
        (SDXL_INPAINT, (), SDXL_INPAINT),
        (SDXL_REFINER, (), SDXL_REFINER),
        (SDXL_BASE, ("v_pred",), SDXL_BASE.with_(prediction="v")),
    ],
    ids=["base", "inpainting", "refiner", "v-marked"],
)
def test_full_size_detected_and_loaded_strictly_from_shapes(cfg, extra, expected):
    header = shapes_header(cfg, "sd_xl_base_1.0.safetensors", extra)
    detected = detect_config(header)
    assert detected == expected
    model = build_empty(detected)
    keys = check_keys(model, header)  # nothing missing, unexpected or mis-shaped
    state = {k: torch.empty(header.tensors[k].shape, device="meta") for k in keys}
    model.load_state_dict(state, strict=True, assign=True)


def test_family_names():
    assert FAMILY_NAMES["sdxl"] == "Stable Diffusion XL"
    assert (
        "inpainting" in FAMILY_NAMES["sdxl-inpaint"] and "refiner" in FAMILY_NAMES["sdxl-refiner"]
    )


def test_truncated_conditioner_is_refused():
    header = shapes_header(SDXL_BASE, "broken.safetensors")
    del header.tensors["conditioner.embedders.1.model.text_projection"]
    with pytest.raises(UserError, match="text_projection"):
        detect_config(header)


def test_config_json_round_trip():
    for cfg in (SDXL_BASE, SDXL_REFINER, TINY_SDXL):
        assert config_from_json(config_to_json(cfg)) == cfg


def test_clip_skip_applies_to_both_towers():
    cfg = with_clip_skip(SDXL_BASE, 3)
    assert cfg.text.clip_skip == cfg.text2.clip_skip == 3
    assert with_clip_skip(SDXL_BASE, 12).text.clip_skip == 12
    with pytest.raises(UserError, match="between 1"):
        with_clip_skip(SDXL_BASE, 13)  # CLIP-L has 12 layers
    assert with_clip_skip(SDXL_REFINER, 32).text.clip_skip == 32


def test_repad():
    tokens = torch.tensor([[49406, 5, 6, 49407, 49407, 49407], [49406, 7, 49407, 0, 0, 0]])
    assert repad(tokens, 0).tolist() == [[49406, 5, 6, 49407, 0, 0], [49406, 7, 49407, 0, 0, 0]]
    assert repad(tokens, 49407)[1].tolist() == [49406, 7, 49407, 49407, 49407, 49407]


# -- tiny original-layout files ---------------------------------------------------------------


def write_original_layout(cfg: ModelConfig, path: Path, seed: int, extra=()) -> Path:
    model = randomize_(LatentDiffusion(cfg), seed)
    state = dict(model.state_dict()) | training_extras(cfg)
    state |= {k: torch.zeros(0) for k in extra}
    return save_checkpoint(state, path)  # no ldm_config: read from shapes alone


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-files")
    inpaint = TINY_SDXL.with_(family="sdxl-inpaint", unet=replace(TINY_SDXL.unet, in_channels=9))
    return {
        "base": write_original_layout(TINY_SDXL, root / "tiny-sdxl.safetensors", 1),
        "refiner": write_original_layout(TINY_SDXL_REFINER, root / "tiny-refiner.safetensors", 2),
        "inpaint": write_original_layout(inpaint, root / "tiny-sdxl-inpaint.safetensors", 3),
        "v": write_original_layout(TINY_SDXL, root / "tiny-sdxl-v.safetensors", 4, ("v_pred",)),
    }


def test_tiny_files_detected_exactly(files):
    assert detect_config(read_header(files["base"])) == TINY_SDXL.with_(default_size=1024)
    refiner = detect_config(read_header(files["refiner"]))
    assert refiner == TINY_SDXL_REFINER.with_(default_size=1024)
    assert detect_config(read_header(files["inpaint"])).family == "sdxl-inpaint"
    assert detect_config(read_header(files["v"])).prediction == "v"


def latents(pipe, sampler="euler_a", steps=6, switch=None, refiner=None):
    if refiner is not None:
        attach_refiner(pipe, refiner, switch)
    try:
        req = Request("a red square", "blurry", steps, 5.0, 7, sampler, "normal", 64, 64)
        cond, uncond = pipe.conditioning([req])
        noise, gen = pipe.initial_noise(req.seed, req.width, req.height)
        return pipe.sample(cond, uncond, noise, [gen], req)
    finally:
        pipe.refiner = None


@pytest.fixture(scope="module")
def pipes(files):
    return {name: load(files[name], device="cpu", dtype="fp32") for name in ("base", "refiner")}


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "dpmpp_sde"])
def test_refiner_switch_at_the_ends(pipes, sampler):
    """Switch 1.0: no refiner step, the base alone, exactly; switch 0: the refiner alone."""
    base, refiner = pipes["base"], pipes["refiner"]
    assert isinstance(base, SDXLPipeline) and base.is_refiner is False and refiner.is_refiner
    alone = latents(base, sampler)
    torch.testing.assert_close(
        latents(base, sampler, switch=1.0, refiner=refiner), alone, rtol=0, atol=0
    )
    only_refiner = latents(refiner, sampler)
    torch.testing.assert_close(
        latents(base, sampler, switch=0.0, refiner=refiner), only_refiner, rtol=0, atol=0
    )
    assert (latents(base, sampler, switch=0.5, refiner=refiner) - alone).abs().max() > 1e-3


@pytest.mark.parametrize(
    "switch, steps, expected", [(0.8, 10, 2), (0.8, 30, 6), (1.0, 10, 0), (0.0, 10, 10)]
)
def test_refiner_step_count(pipes, switch, steps, expected):
    """Steps below timestep round((1 - switch) * 1000); with evenly spaced timesteps that is
    the last (1 - switch) of the steps, as A1111 counts them too."""
    attach_refiner(pipes["base"], pipes["refiner"], switch)
    try:
        assert refiner_step_count(pipes["base"], steps, "euler_a", "normal") == expected
    finally:
        pipes["base"].refiner = None


def test_refiner_calls_go_below_the_cutoff(pipes):
    calls = []
    refiner_unet = pipes["refiner"].model.unet
    handle = refiner_unet.register_forward_pre_hook(lambda _, args: calls.append(float(args[1][0])))
    try:
        latents(pipes["base"], "euler", steps=10, switch=0.8, refiner=pipes["refiner"])
    finally:
        handle.remove()
    assert len(calls) == 2 and all(t < 200 for t in calls)


def test_attach_refiner_checks(pipes, files):
    with pytest.raises(UserError, match="not an SDXL refiner"):
        attach_refiner(pipes["base"], pipes["base"])
    with pytest.raises(UserError, match="needs an SDXL base"):
        attach_refiner(pipes["refiner"], pipes["refiner"])
    with pytest.raises(UserError, match="within"):
        Refiner(pipes["refiner"], 1.5)
    inpaint = load(files["inpaint"], device="cpu", dtype="fp32")
    with pytest.raises(UserError, match="inpainting"):
        attach_refiner(inpaint, pipes["refiner"])
    assert pipes["base"].refiner is None


def test_inpainting_and_refiner_models_generate(files):
    for name in ("inpaint", "refiner"):
        pipe = ldm_cli.load(files[name], device="cpu", dtype="fp32")
        (image,) = pipe.generate("a tree", steps=2, seed=1, width=64, height=64, rescale_cfg=0.5)
        assert image.size == (64, 64) and np.asarray(image).std() > 0
        assert "CFG rescale: 0.5" in image.info["parameters"]


@pytest.mark.slow
def test_info_names_the_families(files):
    base = ldm("info", str(files["base"])).stdout
    assert "family:      sdxl (Stable Diffusion XL)" in base
    assert "prediction:  eps\n" in base and "resolution:  1024x1024" in base
    clip_l = parameters(randomize_(LatentDiffusion(TINY_SDXL)).conditioner.embedders[0])
    assert f"text_encoder:{clip_l:>14,} parameters" in base
    assert "text_encoder_2:" in base and "e.g. conditioner" not in base
    assert "clip skip:   2 (every text encoder)\n" in base
    refiner = ldm("info", str(files["refiner"])).stdout
    assert "family:      sdxl-refiner (Stable Diffusion XL refiner)" in refiner
    assert "text_encoder_2:" not in refiner
    inpaint = ldm("info", str(files["inpaint"])).stdout
    assert "family:      sdxl-inpaint (Stable Diffusion XL inpainting)" in inpaint
    assert "prediction:  v\n" in ldm("info", str(files["v"])).stdout


@pytest.mark.slow
def test_generate_end_to_end(files, tmp_path):
    common = ("generate", "a blue triangle", "--model", str(files["base"]), "-W", "64", "-H", "64",
              "--steps", "3", "--seed", "9")  # fmt: skip
    args = (*common, "--refiner", str(files["refiner"]), "--refiner-switch", "0.5",
            "--rescale-cfg", "0.7", "--clip-skip", "3")  # fmt: skip
    (first,) = written(ldm(*args, "--out", str(tmp_path / "a")))
    p = parse_parameters(read_parameters(first))
    assert (p.width, p.height, p.steps) == (64, 64, 3)
    assert p.extra.get("Clip skip") == "3" and p.extra.get("CFG rescale") == "0.7"
    assert p.extra.get("Refiner", "").startswith("tiny-refiner [")
    assert p.extra.get("Refiner switch at") == "0.5"
    assert pixels(first).shape == (64, 64, 3) and pixels(first).std() > 0
    again = ldm("generate", "--from-png", str(first), "--model", str(files["base"]),
                "--refiner", str(files["refiner"]), "--out", str(tmp_path / "b"))  # fmt: skip
    (second,) = written(again)
    # clip skip, rescale and the refiner's switch (0.5, not the default 0.8) read back
    assert np.array_equal(pixels(first), pixels(second))
    alone = ldm("generate", "--from-png", str(first), "--model", str(files["base"]),
                "--out", str(tmp_path / "f"))  # fmt: skip
    assert "was made with the refiner tiny-refiner [" in alone.stderr
    assert "without --refiner the image will differ" in alone.stderr
    (plain,) = written(ldm(*common, "--out", str(tmp_path / "c")))
    assert not np.array_equal(pixels(first), pixels(plain))
    bad = ldm(*common, "--refiner", str(files["base"]), "--out", str(tmp_path / "d"), check=False)
    assert bad.returncode != 0 and "not an SDXL refiner" in bad.stderr
    bad = ldm(*common, "--rescale-cfg", "2", "--out", str(tmp_path / "e"), check=False)
    assert bad.returncode != 0 and "--rescale-cfg" in bad.stderr
