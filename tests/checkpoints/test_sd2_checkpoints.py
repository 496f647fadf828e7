"""SD 2.x files: full-size shapes from the real configuration (meta device, no data), detection
from tensor shapes, the prediction-type probe and overrides, and `ldm info`/`ldm generate` on
tiny original-layout checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.checkpoints.detect import detect_config
from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.header import CheckpointHeader, TensorInfo
from ldm_cli.checkpoints.prediction import settled_prediction, with_clip_skip
from ldm_cli.checkpoints.save import save_checkpoint
from ldm_cli.core.config import SD2, SD2_INPAINT, SD21, TINY_SD2, ModelConfig
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.models.loading import build_empty, check_keys
from ldm_cli.models.prediction_probe import probe_prediction
from ldm_cli.pipeline.load import load
from ldm_cli.testing import randomize_, training_extras
from tests.cli_helpers import ldm, pixels, written

SD21_UNET_PARAMETERS = 865_910_724
OPENCLIP_H_PARAMETERS = 354_032_641  # all 24 blocks, text_projection and logit_scale
SD_VAE_PARAMETERS = 83_653_863


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def shapes_header(cfg: ModelConfig, name: str, extra: tuple[str, ...] = ()) -> CheckpointHeader:
    """The header of an original-layout file of `cfg` (fp16, with the schedule buffers), built
    from a meta-device model: the real shapes without any data."""
    tensors = {
        k: TensorInfo("F16", tuple(v.shape)) for k, v in build_empty(cfg).state_dict().items()
    }
    tensors |= {k: TensorInfo("F32", tuple(v.shape)) for k, v in training_extras(cfg).items()}
    tensors |= {k: TensorInfo("F32", (0,)) for k in extra}
    return CheckpointHeader(Path(name), tensors, {})


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("cfg", [SD2, SD21, SD2_INPAINT], ids=["sd2", "sd21", "sd2-inpaint"])
def test_full_size_parameter_counts(cfg):
    model = build_empty(cfg)
    inpaint_extra = 5 * 320 * 3 * 3 if cfg.unet.in_channels == 9 else 0  # conv_in's 5 channels
    assert parameters(model.unet) == SD21_UNET_PARAMETERS + inpaint_extra
    assert parameters(model.text_encoder) == OPENCLIP_H_PARAMETERS
    assert parameters(model.vae) == SD_VAE_PARAMETERS


def test_full_size_text_keys_are_open_clip_vit_h():
    """The original file stores open_clip's ViT-H-14 CLIP less its vision tower."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    with torch.device("meta"):
        reference = CLIP(**open_clip.get_model_config("ViT-H-14"))
    del reference.visual
    expected = {f"cond_stage_model.model.{k}": v.shape for k, v in reference.state_dict().items()}
    ours = {k: v.shape for k, v in build_empty(SD21).state_dict().items()}
    assert {k: v for k, v in ours.items() if k.startswith("cond_stage_model.")} == expected


def test_full_size_unet_is_the_parity_tested_one():
    from tests.models.test_unet_parity import SD21_UNET  # checked against diffusers' sd21 config

    assert SD21.unet == SD21_UNET


@pytest.mark.parametrize(
    "cfg, extra, expected",
    [(SD2, (), SD2), (SD21, ("v_pred",), SD21), (SD2_INPAINT, (), SD2_INPAINT)],
    ids=["sd2-base", "768-v-marked", "inpainting"],
)
def test_full_size_detected_and_loaded_strictly_from_shapes(cfg, extra, expected):
    header = shapes_header(cfg, "v2-1_768-ema-pruned.safetensors", extra)
    detected = detect_config(header)
    assert detected == expected
    model = build_empty(detected)
    keys = check_keys(model, header)  # nothing missing, unexpected or mis-shaped
    state = {k: torch.empty(header.tensors[k].shape, device="meta") for k in keys}
    model.load_state_dict(state, strict=True, assign=True)


def test_unmarked_768_v_file_is_left_to_the_probe():
    header = shapes_header(SD21, "v2-1_768.safetensors")
    cfg = detect_config(header)
    assert cfg.family == "sd2" and settled_prediction(cfg, header) is None
    assert settled_prediction(SD2_INPAINT, shapes_header(SD2_INPAINT, "inpaint.safetensors"))


def constant_output_unet(value: float):
    """A tiny SD 2.x U-Net whose output is `value` everywhere (zero last conv, bias `value`)."""
    model = LatentDiffusion(TINY_SD2)
    randomize_(model, seed=2)
    with torch.no_grad():
        model.unet.out[2].weight.zero_()
        model.unet.out[2].bias.fill_(value)
    return model


@pytest.mark.parametrize("value, expected", [(-2.0, "v"), (0.5, "eps"), (0.0, "eps")])
def test_probe_rule(value, expected):
    """v when the mean of output - input (0.5) is below -1, as AUTOMATIC1111 decides."""
    assert probe_prediction(constant_output_unet(value).unet.eval()) == expected


def write_original_layout(model: LatentDiffusion, path: Path, extra=()) -> Path:
    state = dict(model.state_dict()) | training_extras(model.config)
    state |= {k: torch.zeros(0) for k in extra}
    return save_checkpoint(state, path)  # no ldm_config: read from shapes alone


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2-files")
    models = {
        "probed-v": (constant_output_unet(-2.0), ()),
        "probed-eps": (constant_output_unet(0.5), ()),
        "marked-v": (randomize_(LatentDiffusion(TINY_SD2), seed=4), ("v_pred",)),
    }
    return {
        name: write_original_layout(model, root / f"tiny-sd2-{name}.safetensors", extra)
        for name, (model, extra) in models.items()
    }


def test_load_probes_an_unmarked_file(files):
    cfg = load(files["probed-v"], device="cpu", dtype="fp32").config
    assert (cfg.family, cfg.prediction, cfg.default_size) == ("sd2", "v", 768)
    pipe = load(files["probed-eps"], device="cpu", dtype="fp32")
    assert (pipe.config.prediction, pipe.config.default_size) == ("eps", 512)
    pipe = ldm_cli.load(files["probed-eps"], device="cpu", dtype="fp32", prediction="v")
    assert (pipe.config.prediction, pipe.config.default_size) == ("v", 768)


def test_detected_tiny_architecture_is_exact(files):
    cfg = detect_config(read_header(files["marked-v"]))
    assert cfg == TINY_SD2.with_(default_size=768)


def test_clip_skip_option():
    assert with_clip_skip(SD21, None) is SD21
    assert with_clip_skip(SD21, 1).text.clip_skip == 1
    assert with_clip_skip(SD21, 24).text == replace(SD21.text, clip_skip=24)
    for bad in (0, 25):
        with pytest.raises(UserError, match="between 1"):
            with_clip_skip(SD21, bad)


def test_clip_skip_changes_the_conditioning(files):
    default = load(files["marked-v"], device="cpu", dtype="fp32")
    last = load(files["marked-v"], device="cpu", dtype="fp32", clip_skip=1)
    assert default.config.text.clip_skip == 2 and last.config.text.clip_skip == 1
    a, b = (p.encode_prompts(["a red square"]) for p in (default, last))
    assert a.shape == b.shape == (1, 77, 64) and not torch.allclose(a, b)


@pytest.mark.slow
def test_info_names_family_and_prediction(files):
    out = ldm("info", str(files["marked-v"])).stdout
    assert "family:      sd2 (Stable Diffusion 2.x)" in out
    assert "prediction:  v\n" in out and "resolution:  768x768" in out
    probed = ldm("info", str(files["probed-v"])).stdout
    assert "prediction:  v (probed: U-Net output at t=999)" in probed
    forced = ldm("info", str(files["probed-v"]), "--prediction", "eps").stdout
    assert "prediction:  eps (--prediction)" in forced and "resolution:  512x512" in forced


@pytest.mark.slow
def test_generate_end_to_end_with_options(files, tmp_path):
    args = ("generate", "a blue triangle", "--model", str(files["marked-v"]), "-W", "64",
            "-H", "64", "--steps", "2", "--seed", "9", "--clip-skip", "3")  # fmt: skip
    (first,) = written(ldm(*args, "--out", str(tmp_path / "a")))
    p = parse_parameters(read_parameters(first))
    assert (p.width, p.height, p.steps, p.extra.get("Clip skip")) == (64, 64, 2, "3")
    assert pixels(first).shape == (64, 64, 3) and pixels(first).std() > 0
    again = ldm("generate", "--from-png", str(first), "--model", str(files["marked-v"]),
                "--out", str(tmp_path / "b"))  # fmt: skip
    (second,) = written(again)
    assert np.array_equal(pixels(first), pixels(second))  # "Clip skip: 3" was read back
    bad = ldm(*args, "--prediction", "x0", "--out", str(tmp_path / "c"), check=False)
    assert bad.returncode != 0 and "unknown --prediction" in bad.stderr


@pytest.mark.slow
def test_a_prediction_the_file_does_not_settle_is_written_and_read_back(files, tmp_path):
    model = ("--model", str(files["probed-eps"]))
    args = ("generate", "a blue triangle", *model, "-W", "64", "-H", "64", "--steps", "2")
    (forced,) = written(ldm(*args, "--seed", "9", "--prediction", "v", "-o", str(tmp_path)))
    assert parse_parameters(read_parameters(forced)).extra["Prediction"] == "v"
    (again,) = written(ldm("generate", "--from-png", str(forced), *model, "-o", str(tmp_path)))
    assert np.array_equal(pixels(forced), pixels(again))  # not the probe's eps
    (probed,) = written(ldm(*args, "--seed", "9", "-o", str(tmp_path)))
    assert parse_parameters(read_parameters(probed)).extra["Prediction"] == "eps"
    assert not np.array_equal(pixels(forced), pixels(probed))
    marked = ldm("generate", "x", "--model", str(files["marked-v"]), "-W", "64", "-H", "64",
                 "--steps", "1", "-o", str(tmp_path / "m"))  # fmt: skip
    assert "Prediction" not in read_parameters(written(marked)[0])  # the file settles it
