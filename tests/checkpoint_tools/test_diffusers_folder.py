"""Single file <-> diffusers pipeline folder (`ldm convert IN OUT` when IN or OUT is a folder).

Tiny seeded SD 1.x, SD 2.x (v) and SDXL files: the folder ldm writes loads in diffusers'
``from_pretrained`` and renders the image diffusers' ``from_single_file`` renders from the file
(and ldm from the file); it reads back to the file's tensors bit for bit; a folder diffusers
itself saved reads back to the original tensors; the real-size configurations equal the model
repositories'; bad folders get one-line errors naming the problem.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_cli.checkpoint_tools.diffusers_folder import (
    EXTRA_FILE,
    read_diffusers_folder,
    write_diffusers_folder,
)
from ldm_cli.checkpoints.header import KNOWN_EXTRAS
from ldm_cli.checkpoints.pickled import allow_pickle
from ldm_cli.core.config import (
    TINY_SD1,
    TINY_SD2,
    TINY_SDXL,
    TINY_SDXL_REFINER,
)
from ldm_cli.core.errors import UserError
from ldm_cli.pipeline.load import load
from ldm_cli.testing import random_checkpoint
from tests.reference_configs import (
    diffusers_unet_config,
    diffusers_vae_config,
    transformers_clip_config,
)

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE, SEED, SIZE, STEPS = "a red circle on a blue background", "blurry", 1234, 64, 4
CONFIGS = {"sd1": TINY_SD1, "sd2": TINY_SD2, "sdxl": TINY_SDXL}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return {
        name: random_checkpoint(cfg, root / f"tiny-{name}.safetensors", seed=31)
        for name, cfg in CONFIGS.items()
    }


@pytest.fixture(scope="module")
def folders(files, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    return {
        name: write_diffusers_folder(load_file(str(path)), CONFIGS[name], root / name)
        for name, path in files.items()
    }


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A file's tensors less its training leftovers (schedule buffers, EMA, position ids)."""
    return {k: v for k, v in load_file(str(path)).items() if not KNOWN_EXTRAS.match(k)}


def assert_equal_tensors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


# -- bit-exact round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_folder_reads_back_bit_for_bit(name, dtype, files, tmp_path):
    path = files[name]
    if dtype != torch.float32:  # the same model as an fp16 file
        path = tmp_path / "fp16.safetensors"
        save_file({k: v.to(dtype) if v.is_floating_point() else v
                   for k, v in load_file(str(files[name])).items()}, str(path))  # fmt: skip
    folder = write_diffusers_folder(load_file(str(path)), CONFIGS[name], tmp_path / "folder")
    state, cfg = read_diffusers_folder(folder)
    assert_equal_tensors(state, model_tensors(path))
    assert cfg == CONFIGS[name]
    assert not list(tmp_path.glob(".folder.tmp-*"))


def test_refiner_folder_reads_back_bit_for_bit(tmp_path):
    """The SDXL refiner (OpenCLIP bigG alone, in text_encoder_2) as an fp16 file."""
    cfg = TINY_SDXL_REFINER
    path = random_checkpoint(cfg, tmp_path / "refiner.safetensors", seed=5, dtype=torch.float16)
    folder = write_diffusers_folder(load_file(str(path)), cfg, tmp_path / "folder")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None] and not (folder / "text_encoder").exists()
    state, read_cfg = read_diffusers_folder(folder)
    assert_equal_tensors(state, model_tensors(path))
    assert read_cfg == cfg


def test_fp16_variant_and_pickles(folders, files, tmp_path):
    """diffusers' fp16 variant names, sharded weights, and `.bin` pickles only with
    --allow-pickle."""
    folder = Path(shutil.copytree(folders["sd1"], tmp_path / "variant"))
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(str(unet)), str(unet.with_name("diffusion_pytorch_model.fp16.safetensors")))
    unet.unlink()
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors, weight_map = load_file(str(vae)), {}
    for index, key in enumerate(sorted(tensors)):  # two shards and their index
        shard = f"diffusion_pytorch_model-0000{index % 2 + 1}-of-00002.safetensors"
        weight_map[key] = shard
    for shard in set(weight_map.values()):
        part = {k: v for k, v in tensors.items() if weight_map[k] == shard}
        save_file(part, str(vae.with_name(shard)))
    index_json = {"metadata": {}, "weight_map": weight_map}
    vae.with_name("diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(index_json)
    )
    vae.unlink()
    text = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(text)), text.with_name("pytorch_model.bin"))
    text.unlink()
    with pytest.raises(UserError, match="pytorch_model.bin is a pickled checkpoint"):
        read_diffusers_folder(folder)
    with allow_pickle():
        state, _ = read_diffusers_folder(folder)
    assert_equal_tensors(state, model_tensors(files["sd1"]))


# -- diffusers loads the folder and renders the same image ----------------------------------


def sd2_config_dir(root: Path, reference_dir: str) -> Path:
    """The folder `from_single_file(config=...)` reads for TINY_SD2: diffusers' SD 2.x text
    encoder is the OpenCLIP tower less its last block."""
    cfg = TINY_SD2
    text = {**transformers_clip_config(cfg.text),
            "num_hidden_layers": cfg.text.num_hidden_layers - 1}  # fmt: skip
    folders = {
        "unet": {"_class_name": "UNet2DConditionModel", **diffusers_unet_config(cfg.unet)},
        "vae": {"_class_name": "AutoencoderKL", **diffusers_vae_config(cfg.vae)},
        "text_encoder": text,
    }
    for name, config in folders.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    ref = Path(reference_dir) / "sd21"
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(ref / name, root / name)
    index = json.loads((ref / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None])
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def config_dir(name: str, root: Path, reference_dir: str) -> Path:
    if name == "sd1":
        from tests.pipeline.test_pipeline_parity import write_config_dir

        return write_config_dir(root, reference_dir)
    if name == "sdxl":
        from tests.pipeline.test_sdxl import write_config_dir

        return write_config_dir(root, reference_dir, refiner=False)
    return sd2_config_dir(root, reference_dir)


def pipeline_class(name: str):
    return (
        diffusers.StableDiffusionXLPipeline if name == "sdxl" else diffusers.StableDiffusionPipeline
    )


def render(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace"
    )
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
               height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(SEED),
               output_type="np").images[0]  # fmt: skip
    return (out * 255).round().astype(np.uint8)


def assert_same_image(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    print(f"{what}: max pixel difference {diff.max()}")
    assert diff.max() <= 2 and a.std() > 5, what


@pytest.fixture(scope="module")
def single_file_pipes(files, tmp_path_factory, reference_dir):
    pipes = {}
    for name, path in files.items():
        root = config_dir(name, tmp_path_factory.mktemp(f"config-{name}"), reference_dir)
        extra = {} if name == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        pipes[name] = pipeline_class(name).from_single_file(
            str(path), config=str(root), local_files_only=True, torch_dtype=torch.float32, **extra
        )
    return pipes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_renders_the_folder_as_the_file(name, files, folders, single_file_pipes):
    folder_pipe = pipeline_class(name).from_pretrained(str(folders[name]), local_files_only=True)
    assert folder_pipe.tokenizer.pad_token_id == (0 if name == "sd2" else 49407)
    if name == "sdxl":
        assert folder_pipe.tokenizer_2.pad_token_id == 0
    from_folder = render(folder_pipe)
    assert_same_image(from_folder, render(single_file_pipes[name]), f"{name}: from_single_file")
    (ours,) = load(files[name], device="cpu", dtype="fp32").generate(
        PROMPT, NEGATIVE, steps=STEPS, cfg=7.5, seed=SEED, sampler="euler", scheduler="normal",
        width=SIZE, height=SIZE,
    )  # fmt: skip
    assert_same_image(from_folder, np.asarray(ours), f"{name}: ldm")


# -- a folder diffusers saved ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folder_saved_by_diffusers_reads_back(name, files, single_file_pipes, tmp_path):
    single_file_pipes[name].save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / EXTRA_FILE).exists()
    state, cfg = read_diffusers_folder(tmp_path / "saved")
    expected_cfg = CONFIGS[name].with_(default_size=32)  # the test configs' sample_size is 16
    expected = model_tensors(files[name])
    # What diffusers' layout has no place for gets stand-ins: OpenCLIP's logit_scale (ln 100),
    # and SD 2.x's last text block (zeros: it passes the penultimate layer through) and
    # text_projection (the identity; unused by SD 2.x).
    stand_ins = [k for k in expected if k.endswith("logit_scale")]
    if name == "sd2":
        text = expected_cfg.text
        expected_cfg = expected_cfg.with_(text=replace(text, projection_dim=text.hidden_size))
        last = f"resblocks.{text.num_hidden_layers - 1}."
        stand_ins += [k for k in expected if last in k or k.endswith("text_projection")]
    assert cfg == expected_cfg
    for key in stand_ins:
        del expected[key]
        value = state.pop(key)
        if key.endswith("logit_scale"):
            assert math.isclose(value.item(), math.log(100), rel_tol=1e-6)
        elif key.endswith("text_projection"):
            assert torch.equal(value, torch.eye(value.shape[0]))
        else:
            assert not value.any()
    assert_equal_tensors(state, expected)


# -- the tokenizers ---------------------------------------------------------------------------


def test_tokenizer_files_are_the_repositories(folders, reference_dir):
    ref = Path(reference_dir) / "sdxl-base"
    for tokenizer in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            ours = (folders["sdxl"] / tokenizer / name).read_text(encoding="utf-8")
            theirs = (ref / tokenizer / name).read_text(encoding="utf-8")
            if name == "vocab.json":
                assert json.loads(ours) == json.loads(theirs)
            else:
                assert ours == theirs


# -- bad input -------------------------------------------------------------------------------


def test_not_a_pipeline_folder(tmp_path, folders):
    with pytest.raises(UserError, match="no model_index.json"):
        read_diffusers_folder(tmp_path)
    folder = Path(shutil.copytree(folders["sd1"], tmp_path / "flux"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="'FluxPipeline' is not a Stable Diffusion"):
        read_diffusers_folder(folder)


def test_missing_part(tmp_path, folders):
    folder = Path(shutil.copytree(folders["sd1"], tmp_path / "no-vae"))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"missing vae/diffusion_pytorch_model.safetensors"):
        read_diffusers_folder(folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(UserError, match=r"missing text_encoder/config.json"):
        read_diffusers_folder(folder)


def test_mis_shaped_or_missing_tensor(tmp_path, folders):
    folder = Path(shutil.copytree(folders["sdxl"], tmp_path / "bad"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    key = "down_blocks.1.attentions.0.proj_in.weight"
    save_file({**tensors, key: tensors[key][:-1]}, str(weights))
    with pytest.raises(UserError, match=rf"unet/{key} has shape \[127, 128\], the model needs"):
        read_diffusers_folder(folder)
    del tensors[key]
    save_file(tensors, str(weights))
    with pytest.raises(UserError, match=rf"unet: missing tensor {key}"):
        read_diffusers_folder(folder)


def test_write_refuses_bad_state_and_existing_folder(tmp_path, files):
    state = load_file(str(files["sd2"]))
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    with pytest.raises(UserError, match=rf"{key} has shape \[191, 64\]"):
        write_diffusers_folder({**state, key: state[key][1:]}, TINY_SD2, tmp_path / "a")
    with pytest.raises(UserError, match="missing tensor first_stage_model.quant_conv.weight"):
        state_less = {k: v for k, v in state.items() if k != "first_stage_model.quant_conv.weight"}
        write_diffusers_folder(state_less, TINY_SD2, tmp_path / "b")
    with pytest.raises(UserError, match="unexpected tensor lora.weight"):
        write_diffusers_folder({**state, "lora.weight": torch.zeros(1)}, TINY_SD2, tmp_path / "c")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        write_diffusers_folder(state, TINY_SD2, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half-written
