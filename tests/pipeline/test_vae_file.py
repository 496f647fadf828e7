"""`--vae FILE`: a separate VAE (original or diffusers layout) or a TAESD, against diffusers'
StableDiffusionPipeline given the same decoder, on seeded random SD 1.x-layout weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_cli.checkpoints.detect.vae_file import original_vae_key
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import parse_parameters
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.pipeline.load import load
from ldm_cli.runtime.preview import PreviewWriter
from ldm_cli.testing import random_checkpoint, randomize_
from tests.models.taesd_helpers import diffusers_reference, write_taesd_files
from tests.pipeline.test_pipeline_parity import (  # noqa: F401 (fixtures)
    NEGATIVE,
    PROMPT,
    SEED,
    SIZE,
    assert_same_image,
    checkpoint,
    reference_pipe,
    write_config_dir,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_state():
    """A VAE of the tiny model's shape with weights of its own (not the checkpoint's)."""
    return {
        k: v.clone()
        for k, v in randomize_(AutoencoderKL(TINY_SD1.vae), seed=77).state_dict().items()
    }


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory, vae_state, reference_dir):
    folder = tmp_path_factory.mktemp("vae")
    original = folder / "vae-tiny-ft.safetensors"
    save_file(vae_state, str(original))
    prefixed = folder / "vae-prefixed.safetensors"
    save_file({"first_stage_model." + k: v for k, v in vae_state.items()}, str(prefixed))
    config_dir = write_config_dir(folder / "config", reference_dir)
    reference = diffusers.AutoencoderKL.from_single_file(
        str(original), config=str(config_dir), subfolder="vae", local_files_only=True
    )
    in_diffusers = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(in_diffusers))
    return {"original": original, "prefixed": prefixed, "diffusers": in_diffusers}, reference


def diffusers_image(pipe, vae) -> np.ndarray:
    from diffusers import EulerDiscreteScheduler

    own = pipe.vae
    pipe.vae = vae
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.original_scheduler_config)
    try:
        out = pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5,
            height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
        ).images[0]  # fmt: skip
    finally:
        pipe.vae = own
    return (out * 255).round().astype(np.uint8)


def our_image(checkpoint, vae_path, preview=None):  # noqa: F811
    pipe = load(checkpoint, device="cpu", dtype="fp32", vae=vae_path)
    pipe.preview = preview
    (image,) = pipe.generate(
        PROMPT, NEGATIVE, steps=6, cfg=7.5, seed=SEED, sampler="euler", scheduler="normal",
        width=SIZE, height=SIZE,
    )  # fmt: skip
    return image


@pytest.mark.parametrize("layout", ["original", "prefixed", "diffusers"])
def test_a_vae_file_decodes_as_diffusers_from_single_file(
    checkpoint,  # noqa: F811
    reference_pipe,  # noqa: F811
    vae_files,
    layout,
):
    files, reference_vae = vae_files
    expected = diffusers_image(reference_pipe, reference_vae)
    image = our_image(checkpoint, files[layout])
    assert_same_image(np.asarray(image), expected)
    # the model's own VAE gives another picture: the file really was used
    own = diffusers_image(reference_pipe, reference_pipe.vae)
    assert np.abs(own.astype(int) - expected).max() > 20
    params = parse_parameters(image.info["parameters"])
    assert params.extra["VAE"] == files[layout].stem
    assert len(params.extra["VAE hash"]) == 10


# TAESD scales by 8, as real VAEs do: a tiny model with a four-level VAE
TINY_SD1_X8 = replace(TINY_SD1, vae=replace(TINY_SD1.vae, ch_mult=(1, 1, 1, 1)))


def test_a_taesd_file_decodes_as_diffusers_autoencoder_tiny(tmp_path, reference_dir):
    from diffusers import StableDiffusionPipeline

    x8_file = random_checkpoint(TINY_SD1_X8, tmp_path / "tiny-x8.safetensors", seed=3)
    config_dir = write_config_dir(tmp_path / "config", reference_dir, TINY_SD1_X8)
    reference = StableDiffusionPipeline.from_single_file(
        str(x8_file), config=str(config_dir), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=torch.float32,
    )  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    reference.original_scheduler_config = dict(reference.scheduler.config)
    paths = write_taesd_files(tmp_path, latent_channels=4, seed=5)
    expected = diffusers_image(reference, diffusers_reference(4, seed=5))
    assert expected.shape == (SIZE, SIZE, 3)
    for layout in ("decoder", "diffusers"):
        image = our_image(x8_file, paths[layout])
        assert_same_image(np.asarray(image), expected)
        assert f"VAE: {paths[layout].stem}" in image.info["parameters"]
    # previews are decoded by the TAESD too: the last one is the image, at twice its size
    preview = PreviewWriter(tmp_path / "preview.png", every=1)
    image = our_image(x8_file, paths["decoder"], preview)
    with Image.open(tmp_path / "preview.png") as shown:
        assert shown.size == (2 * SIZE, 2 * SIZE)
        last = np.asarray(shown.convert("RGB"))[::2, ::2]
    assert np.abs(last.astype(int) - np.asarray(image).astype(int)).max() <= 1
    with pytest.raises(UserError, match="TAESD for 8x latents; tiny-sd1's VAE scales by 2"):
        load(
            random_checkpoint(TINY_SD1, tmp_path / "tiny-sd1.safetensors", seed=3),
            vae=paths["decoder"],
        )


def test_bad_vae_files_are_one_line_errors(checkpoint, tmp_path, vae_state):  # noqa: F811
    taesd = write_taesd_files(tmp_path, latent_channels=16, seed=1)
    cases = {
        "taesd16": (taesd["decoder"], "TAESD for 16-channel latents"),
    }
    (tmp_path / "e4").mkdir()
    cases["encoder-only"] = (
        write_taesd_files(tmp_path / "e4", 4, 2)["encoder"],
        "only a TAESD encoder",
    )
    wide = {k: v for k, v in vae_state.items()}
    wide["decoder.conv_in.weight"] = torch.zeros(8, 8, 3, 3)  # another family's width
    save_file(wide, str(tmp_path / "wide.safetensors"))
    cases["shape"] = (tmp_path / "wide.safetensors", r"decoder.conv_in.weight is \[8, 8, 3, 3\]")
    short = {k: v for k, v in vae_state.items() if not k.startswith("encoder.conv_in")}
    save_file(short, str(tmp_path / "short.safetensors"))
    cases["missing"] = (tmp_path / "short.safetensors", "lacks encoder.conv_in.bias")
    save_file({"something.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    cases["other"] = (tmp_path / "other.safetensors", "is not a VAE file")
    for path, message in cases.values():
        with pytest.raises(UserError, match=message) as error:
            load(checkpoint, device="cpu", dtype="fp32", vae=path)
        assert "\n" not in str(error.value)


def test_diffusers_names_map_to_the_original_ones():
    assert original_vae_key("decoder.up_blocks.0.resnets.2.conv_shortcut.weight", 4) == (
        "decoder.up.3.block.2.nin_shortcut.weight"
    )
    assert original_vae_key("encoder.down_blocks.1.downsamplers.0.conv.bias", 4) == (
        "encoder.down.1.downsample.conv.bias"
    )
    assert original_vae_key("decoder.mid_block.attentions.0.to_out.0.weight", 4) == (
        "decoder.mid.attn_1.proj_out.weight"
    )
    assert original_vae_key("encoder.mid_block.attentions.0.query.bias", 4) == (
        "encoder.mid.attn_1.q.bias"
    )
    assert original_vae_key("decoder.mid_block.resnets.1.norm2.weight", 4) == (
        "decoder.mid.block_2.norm2.weight"
    )
    assert original_vae_key("encoder.conv_norm_out.weight", 4) == "encoder.norm_out.weight"
    assert original_vae_key("post_quant_conv.weight", 4) == "post_quant_conv.weight"
