"""`ldm train lora` / `ldm train ti` on a tiny SD 1.x-layout checkpoint (seeded random
weights): the files they write load in diffusers (`load_lora_weights`,
`load_textual_inversion`) and give the same image as `ldm` with them, Euler, same seed; a run
stopped (or killed) and resumed ends with the same file, byte for byte; bad input is a
one-line error before anything is written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.networks.tags import parse_lora_option
from ldm_cli.pipeline.load import load
from ldm_cli.testing import random_checkpoint
from ldm_cli.training.adapter_data import CaptionOptions
from ldm_cli.training.adapter_job import AdapterJob
from ldm_cli.training.lora_network import LoraSpec
from ldm_cli.training.lora_run import LoraJob, train_lora
from ldm_cli.training.ti_run import TiJob, train_ti
from tests.pipeline.test_pipeline_parity import write_config_dir

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT = "a zorp on a red background"
NEGATIVE = "blurry"
SEED = 7
STEPS = 8


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def write_folder(root: Path, count: int = 4) -> Path:
    """Crosses on plain backgrounds, captioned with the new word, in kohya's layout."""
    root.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "yellow"]
    for k in range(count):
        image = Image.new("RGB", (80, 64), colours[k % 4])  # not square: resized and cropped
        draw = ImageDraw.Draw(image)
        draw.rectangle((30, 12, 50, 52), fill="white")
        draw.rectangle((20, 24, 60, 40), fill="white")
        image.save(root / f"{k:03d}.png")
        (root / f"{k:03d}.txt").write_text(f"a zorp on a {colours[k % 4]} background")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    checkpoint = random_checkpoint(TINY_SD1, root / "tiny-sd1.safetensors", seed=11)
    return checkpoint, write_folder(root / "data")


def job(files, out: Path, **changes) -> AdapterJob:
    checkpoint, data = files
    base = AdapterJob(
        data_dir=data, out=out, model=checkpoint, steps=6, batch_size=2, lr=3e-2, seed=5,
        save_every=2, quiet=True,
    )  # fmt: skip
    return replace(base, **changes)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory, reference_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    config_dir = write_config_dir(tmp_path_factory.mktemp("config"), reference_dir)
    pipe = StableDiffusionPipeline.from_single_file(
        str(files[0]), config=str(config_dir), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=torch.float32,
    )  # fmt: skip
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def their_image(pipe) -> np.ndarray:
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
        height=64, width=64, generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images[0]  # fmt: skip
    return (out * 255).round().astype(np.uint8)


def our_image(pipe) -> np.ndarray:
    (image,) = pipe.generate(
        PROMPT, NEGATIVE, steps=STEPS, cfg=7.5, seed=SEED, sampler="euler", scheduler="normal",
        width=64, height=64,
    )  # fmt: skip
    return np.asarray(image)


def assert_same(ours: np.ndarray, theirs: np.ndarray, plain: np.ndarray) -> None:
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    moved = np.abs(ours.astype(int) - plain.astype(int))
    print(f"adapter effect mean {moved.mean():.2f}; ldm-diffusers max {diff.max()}")
    assert diff.max() <= 2, f"max pixel difference {diff.max()}"
    assert moved.mean() > 10 * max(diff.mean(), 0.05)  # the adapter changed the picture


def test_trained_lora_loads_in_diffusers_with_the_same_image(files, reference, tmp_path):
    """LoCon (transformer layers, 3x3 and 1x1 convolutions) and the text encoder."""
    out = tmp_path / "zorp.safetensors"
    spec = LoraSpec(rank=4, alpha=4.0, modules="locon", text_encoder=True)
    summary = train_lora(LoraJob(job(files, out), spec))
    assert summary is not None and summary["layers"] > 0
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_down_blocks_") for k in keys)
    assert any("_resnets_0_conv1.lora_down" in k for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert len(meta["sshs_model_hash"]) == 64

    ours = load(files[0], device="cpu", dtype="fp32")
    plain = our_image(ours)
    ours.networks.loras = [parse_lora_option(f"{out}:1")]
    with_lora = our_image(ours)
    ours.networks.loras = []
    ours.networks.restore()
    reference.load_lora_weights(str(out))
    try:
        theirs = their_image(reference)
    finally:
        reference.unload_lora_weights()
    assert_same(with_lora, theirs, plain)


def test_peft_layout_holds_the_same_tensors(files):
    """--format peft: the kohya file's tensors under diffusers' names, alpha in the metadata."""
    from ldm_cli.training.lora_network import LoraNetwork

    pipe = load(files[0], device="cpu", dtype="fp32")
    network = LoraNetwork(pipe.model, LoraSpec(rank=4, alpha=2.0, text_encoder=False))
    network.reset(0)
    kohya, peft = network.tensors("kohya", torch.float32), network.tensors("peft", torch.float32)
    downs = sorted(k for k in kohya if k.endswith("lora_down.weight"))
    ups = sorted(k for k in peft if k.endswith("lora_A.weight"))
    assert len(downs) == len(ups) == len(network.layers) > 0
    assert all(k.startswith("unet.") for k in ups)
    assert {kohya[k].sum().item() for k in downs} == {peft[k].sum().item() for k in ups}
    assert '"unet.lora_alpha": 2.0' in network.peft_metadata()["lora_adapter_metadata"]


def test_trained_embedding_loads_in_diffusers_with_the_same_image(files, reference, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    out = folder / "zorp.safetensors"
    summary = train_ti(TiJob(job(files, out, lr=0.5), "zorp", init_word="circle", vectors=2))
    assert summary is not None
    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, 32)

    ours = load(files[0], device="cpu", dtype="fp32")
    plain = our_image(ours)
    ours.networks.load_embeddings(folder)
    with_embedding = our_image(ours)
    reference.load_textual_inversion(str(out), token="zorp")
    try:
        theirs = their_image(reference)
    finally:
        reference.unload_textual_inversion()
    assert_same(with_embedding, theirs, plain)


def test_ti_pt_file_is_a1111s_format(files, tmp_path):
    out = tmp_path / "zorp.pt"
    train_ti(TiJob(job(files, out, steps=2), "zorp"))
    data = torch.load(out, weights_only=True)
    assert data["name"] == "zorp" and data["step"] == 2
    assert data["string_to_param"]["*"].shape == (1, 32)


@pytest.mark.parametrize("kind", ["lora", "ti"])
def test_a_stopped_run_resumed_writes_the_same_bytes(files, tmp_path, kind):
    def run(out: Path, **changes):
        adapter_job = job(files, out, **{"steps": 4, **changes})
        if kind == "lora":
            return train_lora(LoraJob(adapter_job, LoraSpec(rank=2, text_encoder=True)))
        return train_ti(TiJob(adapter_job, "zorp"))

    whole = tmp_path / "whole" / "zorp.safetensors"
    whole.parent.mkdir()
    assert run(whole) is not None
    cut = tmp_path / "cut" / "zorp.safetensors"
    cut.parent.mkdir()
    assert run(cut, stop_after=3) is None  # saved at step 2: step 3 is done again
    assert not cut.exists()
    with pytest.raises(UserError, match="--resume"):
        run(cut)
    with pytest.raises(UserError, match="lr"):
        run(cut, resume=True, lr=1e-2)
    assert run(cut, resume=True) is not None
    assert cut.read_bytes() == whole.read_bytes()


def test_bad_input_is_a_one_line_error_and_writes_nothing(files, tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(UserError, match="exists"):
        train_lora(LoraJob(job(files, out), LoraSpec()))
    assert out.read_bytes() == b"keep"
    fresh = tmp_path / "y.safetensors"
    with pytest.raises(UserError, match="rank"):
        train_lora(LoraJob(job(files, fresh), LoraSpec(rank=0)))
    with pytest.raises(UserError, match="--size"):
        train_lora(LoraJob(job(files, fresh, size=63), LoraSpec()))
    with pytest.raises(UserError, match="holds the token"):
        train_ti(TiJob(job(files, tmp_path / "blorf.safetensors"), "blorf"))
    with pytest.raises(UserError, match="name the file zorp.safetensors"):
        train_ti(TiJob(job(files, fresh), "zorp"))
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.new("RGB", (64, 64)).save(bare / "a.png")
    with pytest.raises(UserError, match="no caption"):
        train_lora(LoraJob(job(files, fresh, data_dir=bare), LoraSpec()))
    captioned = job(files, fresh, data_dir=bare, captions=CaptionOptions(template="a [name]"))
    assert train_lora(LoraJob(replace(captioned, steps=1), LoraSpec(rank=1))) is not None
    assert not (tmp_path / "x.train").exists()


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
def test_other_families_train_and_load_back(tmp_path, family):
    """SD 2.x (v prediction, OpenCLIP: q/k/v rows of the fused projection) and SDXL (two towers,
    size conditioning): a LoRA with its text encoder and an embedding train and change the
    image when loaded back; the names are kohya's for the family."""
    from ldm_cli.core.config import TINY_SD2, TINY_SDXL

    cfg = replace(TINY_SD2, prediction="v") if family == "sd2-v" else TINY_SDXL
    checkpoint = random_checkpoint(cfg, tmp_path / f"{family}.safetensors", seed=2)
    files = (checkpoint, write_folder(tmp_path / "data", count=2))
    lora = tmp_path / "l.safetensors"
    spec = LoraSpec(rank=2, modules="locon", text_encoder=True)
    train_lora(LoraJob(job(files, lora, steps=2, size=64), spec))
    folder = tmp_path / "emb"
    folder.mkdir()
    train_ti(TiJob(job(files, folder / "zorp.safetensors", steps=2, lr=0.5, size=64), "zorp"))
    with safe_open(str(lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    with safe_open(str(folder / "zorp.safetensors"), "pt") as f:
        towers = set(f.keys())
    if family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
        assert any(k.startswith("lora_te1_") for k in keys)
        assert any(k.startswith("lora_te2_") for k in keys)
        assert towers == {"clip_l", "clip_g"} and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    else:
        assert any("self_attn_q_proj" in k for k in keys) and towers == {"emb_params"}
        # clip skip 2: the last layer's output is never read, so it is not trained
        last = cfg.text.num_hidden_layers - 1
        assert cfg.text.clip_skip == 2 and not any(f"layers_{last}_" in k for k in keys)
        assert meta["ss_v_parameterization"] == "True" and meta["ss_v2"] == "True"

    pipe = load(checkpoint, device="cpu", dtype="fp32")
    size = 64

    def image():
        (out,) = pipe.generate(PROMPT, steps=2, seed=1, width=size, height=size)
        return np.asarray(out).astype(int)

    plain = image()
    pipe.networks.loras = [parse_lora_option(f"{lora}:1")]
    assert np.abs(image() - plain).max() > 0
    pipe.networks.loras = []
    pipe.networks.restore()
    assert np.array_equal(image(), plain)
    pipe.networks.load_embeddings(folder)
    assert np.abs(image() - plain).max() > 0


def test_gradient_checkpointing_gives_the_same_lora(files, tmp_path):
    plain, checkpointed = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    spec = LoraSpec(rank=2, modules="locon")
    train_lora(LoraJob(job(files, plain, steps=2), spec))
    train_lora(LoraJob(job(files, checkpointed, steps=2, checkpointing=True), spec))
    with safe_open(str(plain), "pt") as a, safe_open(str(checkpointed), "pt") as b:
        for key in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
