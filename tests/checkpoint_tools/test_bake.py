"""`ldm convert --vae FILE` and `--lora FILE:W`: the baked checkpoint makes the image that the
same VAE or LoRAs make at generate time (tiny seeded model, VAE and LoRA files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ldm_cli
from ldm_cli.checkpoint_tools.convert import ConvertJob, run_convert
from ldm_cli.checkpoints.hash import model_hash
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.networks.files import lora_hash
from ldm_cli.testing import random_checkpoint
from tests.checkpoint_tools.helpers import write_lora, write_vae

SETTINGS = {"steps": 4, "cfg": 7.5, "seed": 21, "sampler": "euler", "width": 64, "height": 64}
PROMPT = "a red circle on a blue background"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bake")
    checkpoint = random_checkpoint(TINY_SD1, folder / "tiny.safetensors", seed=11)
    other = random_checkpoint(TINY_SD1, folder / "other.safetensors", seed=12)
    return {
        "checkpoint": checkpoint,
        "vae": write_vae(folder / "vae.safetensors", other, seed=5),
        "vae_prefixed": write_vae(folder / "vae-prefixed.pt.safetensors", other, 6, "vae."),
        "lora": write_lora(folder / "ink.safetensors", TINY_SD1, seed=7),
        "dora": write_lora(folder / "dora.safetensors", TINY_SD1, seed=8, dora=True),
    }


def image(pipe) -> np.ndarray:
    (picture,) = pipe.generate(PROMPT, **SETTINGS)
    return np.asarray(picture).astype(int)


def load(path: Path, **options):
    return ldm_cli.load(path, device="cpu", dtype="fp32", **options)


def record(path: Path) -> dict:
    with safe_open(str(path), "pt") as file:
        return json.loads(file.metadata()["ldm_convert"])


@pytest.mark.parametrize("vae", ["vae", "vae_prefixed"])
def test_a_baked_vae_makes_the_image_of_vae_at_generate_time(files, tmp_path, vae):
    out = run_convert(
        ConvertJob(files["checkpoint"], tmp_path / "baked.safetensors", vae=files[vae])
    )
    baked = image(load(out))
    assert np.array_equal(baked, image(load(files["checkpoint"], vae=files[vae])))
    assert not np.array_equal(baked, image(load(files["checkpoint"])))  # the VAE changed it
    assert baked.std() > 5
    assert record(out)["vae"] == {"name": files[vae].name, "hash": model_hash(files[vae])}
    source, result = load_file(str(files["checkpoint"])), load_file(str(out))
    unchanged = [k for k in source if not k.startswith("first_stage_model.")]
    assert all(torch.equal(source[k], result[k]) for k in unchanged)


def test_a_diffusers_layout_vae_is_renamed_as_at_generate_time(files, tmp_path, reference_dir):
    diffusers = pytest.importorskip("diffusers")
    from tests.pipeline.test_pipeline_parity import write_config_dir

    config = write_config_dir(tmp_path / "config", reference_dir)
    reference = diffusers.AutoencoderKL.from_single_file(
        str(files["vae"]), config=str(config), subfolder="vae", local_files_only=True
    )
    renamed = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(renamed))
    out = run_convert(ConvertJob(files["checkpoint"], tmp_path / "baked.safetensors", vae=renamed))
    plain = run_convert(
        ConvertJob(files["checkpoint"], tmp_path / "p.safetensors", vae=files["vae"])
    )
    ours, theirs = load_file(str(out)), load_file(str(plain))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bad_vae_files_are_refused(files, tmp_path):
    from tests.models.taesd_helpers import write_taesd_files

    taesd = write_taesd_files(tmp_path, 4, seed=1)["decoder"]
    lacking = load_file(str(files["vae"]))
    lacking.pop("decoder.conv_out.bias")
    save_file(lacking, str(tmp_path / "lacking.safetensors"))
    cases = [
        (taesd, "is a TAESD"),
        (tmp_path / "lacking.safetensors", "lacks"),
        (files["checkpoint"], "is not a VAE file: it holds other tensors too"),
    ]
    for vae, message in cases:
        with pytest.raises(UserError, match=message):
            run_convert(ConvertJob(files["checkpoint"], tmp_path / "out.safetensors", vae=vae))
        assert not (tmp_path / "out.safetensors").exists()


def test_baked_loras_make_the_image_of_lora_at_generate_time(files, tmp_path):
    loras = ((files["lora"], 0.7), (files["dora"], -0.4))
    out = run_convert(ConvertJob(files["checkpoint"], tmp_path / "baked.safetensors", loras=loras))
    live = load(files["checkpoint"])
    for path, weight in loras:
        live.networks.add_lora(f"{path}:{weight}")
    expected = image(live)  # the LoRAs are applied now
    params = dict(live.model.named_parameters())
    baked = load_file(str(out))
    source = load_file(str(files["checkpoint"]))
    changed = [k for k in baked if not torch.equal(baked[k], source[k])]
    assert len(changed) > 20
    for key in changed:  # fp32: the very weights --lora patches in
        assert torch.equal(baked[key], params[key].detach()), key
    got = image(load(out))
    assert np.abs(got - expected).max() <= 1
    assert not np.array_equal(got, image(load(files["checkpoint"])))
    assert record(out)["loras"] == [
        {"name": "ink.safetensors", "hash": lora_hash(files["lora"]), "weight": 0.7},
        {"name": "dora.safetensors", "hash": lora_hash(files["dora"]), "weight": -0.4},
    ]


def test_a_lora_baked_into_fp16_is_the_fp32_sum_cast_once(files, tmp_path):
    fp32 = run_convert(
        ConvertJob(files["checkpoint"], tmp_path / "a.safetensors", loras=((files["lora"], 1.0),))
    )
    fp16 = run_convert(
        ConvertJob(
            files["checkpoint"], tmp_path / "b.safetensors", "fp16", loras=((files["lora"], 1.0),)
        )
    )
    wide, narrow = load_file(str(fp32)), load_file(str(fp16))
    for key, tensor in wide.items():
        want = tensor.half() if tensor.is_floating_point() else tensor
        assert torch.equal(narrow[key], want), key


def test_a_lora_for_another_model_is_a_one_line_error(files, tmp_path):
    stranger = tmp_path / "stranger.safetensors"
    save_file(
        {
            "lora_unet_nothing_here.lora_down.weight": torch.ones(2, 4),
            "lora_unet_nothing_here.lora_up.weight": torch.ones(4, 2),
        },
        str(stranger),
    )
    with pytest.raises(UserError, match="matches no layer"):
        run_convert(
            ConvertJob(files["checkpoint"], tmp_path / "o.safetensors", loras=((stranger, 1.0),))
        )
    assert not (tmp_path / "o.safetensors").exists()
