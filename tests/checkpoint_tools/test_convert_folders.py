"""`ldm convert` through every format: a pickle -> .safetensors -> a diffusers folder -> a single
file again keeps every tensor a model is built from byte for byte, and diffusers (from the
single file and from the folder) and ldm (from the file that came back) make the same image."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_cli.checkpoint_tools.convert import ConvertJob, run_convert
from ldm_cli.checkpoints.header import KNOWN_EXTRAS
from ldm_cli.core.config import TINY_SD1, TINY_SDXL
from ldm_cli.core.errors import UserError
from ldm_cli.pipeline.load import load
from ldm_cli.testing import random_checkpoint
from tests.checkpoint_tools.test_convert import assert_identical

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE, SEED = "a red circle on a blue background", "blurry", 1234
# A pickle carries no ldm_config: its architecture is read from shapes alone, which cannot tell
# attention heads (SD 1.x's U-Net has 8, CLIP one per 64 channels). The tiny model here has
# those, so the file, the folder and diffusers' configuration describe the same model.
SHAPES_SD1 = TINY_SD1.with_(
    unet=replace(TINY_SD1.unet, num_heads=8), text=replace(TINY_SD1.text, num_attention_heads=1)
)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def chain(folder: Path, cfg, dtype=None) -> dict[str, Path]:
    """The same model as a .ckpt, then converted to .safetensors, a folder and a file again."""
    original = random_checkpoint(cfg, folder / "original.safetensors", seed=5, with_metadata=False)
    pickled = folder / "model.ckpt"
    torch.save({"state_dict": load_file(str(original)), "global_step": 1}, pickled)
    single = run_convert(ConvertJob(pickled, folder / "model.safetensors", dtype))
    tree = run_convert(ConvertJob(single, folder / "model-diffusers"))
    back = run_convert(ConvertJob(tree, folder / "back.safetensors"))
    return {"original": original, "single": single, "folder": tree, "back": back}


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """What a model is built from: the tensors that are not schedule or EMA leftovers."""
    return {k: v for k, v in load_file(str(path)).items() if not KNOWN_EXTRAS.match(k)}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> dict[str, Path]:
    return chain(tmp_path_factory.mktemp("sd1"), SHAPES_SD1)


def test_a_pickle_comes_back_from_a_diffusers_folder_byte_for_byte(sd1):
    assert_identical(model_tensors(sd1["single"]), model_tensors(sd1["original"]))
    assert_identical(model_tensors(sd1["back"]), model_tensors(sd1["original"]))
    assert (sd1["folder"] / "model_index.json").is_file()


def test_sdxl_in_bf16_comes_back_from_a_diffusers_folder_byte_for_byte(tmp_path):
    files = chain(tmp_path, TINY_SDXL, "bf16")
    original = model_tensors(files["original"])
    cast = {k: v.bfloat16() if v.is_floating_point() else v for k, v in original.items()}
    assert_identical(model_tensors(files["back"]), cast)


def their_image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace"
    )
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=64,
        width=64, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    return (out * 255).round().astype(int)


def our_image(path: Path) -> np.ndarray:
    (image,) = load(path, device="cpu", dtype="fp32").generate(
        PROMPT, NEGATIVE, steps=4, cfg=7.5, seed=SEED, sampler="euler", scheduler="normal",
        width=64, height=64,
    )  # fmt: skip
    return np.asarray(image).astype(int)


def test_diffusers_makes_the_same_image_from_the_file_and_the_folder(sd1, tmp_path, reference_dir):
    from tests.pipeline.test_pipeline_parity import write_config_dir

    config = write_config_dir(tmp_path / "config", reference_dir, SHAPES_SD1)
    from_file = diffusers.StableDiffusionPipeline.from_single_file(
        str(sd1["single"]), config=str(config), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=torch.float32,
    )  # fmt: skip
    from_folder = diffusers.StableDiffusionPipeline.from_pretrained(
        str(sd1["folder"]), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=torch.float32,
    )  # fmt: skip
    for part in ("unet", "vae", "text_encoder"):  # diffusers holds the same weights either way
        mine, theirs = (
            getattr(from_file, part).state_dict(),
            getattr(from_folder, part).state_dict(),
        )
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), part
    file_image, folder_image = their_image(from_file), their_image(from_folder)
    assert np.abs(file_image - folder_image).max() <= 1
    assert file_image.std() > 5
    ours = our_image(sd1["back"])
    assert np.abs(ours - file_image).max() <= 2  # ldm against diffusers (test_pipeline_parity)
    assert np.array_equal(ours, our_image(sd1["original"]))


def test_a_folder_output_that_exists_is_refused(sd1, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists"):
        run_convert(ConvertJob(sd1["single"], taken))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
