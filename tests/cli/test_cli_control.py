"""`--control` on generate, img2img, inpaint and outpaint, `ldm preprocess`, and the bad inputs
each refused in one line with nothing written (tiny random checkpoints and ControlNets)."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, one_thread_per_command, pixels, written  # noqa: F401
from tests.control.controlnet_helpers import random_controlnet, save_state
from tests.models.test_unet_parity import TINY_SDXL


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("control-cli")
    sketch = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(sketch).ellipse((12, 12, 44, 44), outline="black", width=3)
    sketch.save(root / "sketch.png")
    Image.new("RGB", (64, 32), "white").save(root / "wide.png")
    Image.new("RGB", (96, 64), "white").save(root / "canvas.png")  # outpaint's grown canvas
    Image.new("RGB", (64, 64), (90, 120, 200)).save(root / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    mask.save(root / "mask.png")
    net = random_controlnet(TINY_SD1.unet, seed=3, scale=3.0, widths=(16, 32))
    sdxl_net = random_controlnet(TINY_SDXL, seed=4, widths=(16, 32))
    return {
        "root": root,
        "model": random_checkpoint(TINY_SD1, root / "tiny-sd1.safetensors", seed=2),
        "cn": save_state(net.state_dict(), root / "cn-a.safetensors", "control_model."),
        "cn_b": save_state(net.state_dict(), root / "cn-b.safetensors", "control_model."),
        "cn_sdxl": save_state(sdxl_net.state_dict(), root / "cn-xl.safetensors", "control_model."),
        "sketch": root / "sketch.png",
        "wide": root / "wide.png",
        "canvas": root / "canvas.png",
        "photo": root / "photo.png",
        "mask": root / "mask.png",
    }


def base_args(files, out):
    return ("--model", str(files["model"]), "--steps", "3", "--seed", "5", "--out", str(out))


def test_generate_with_two_controlnets_writes_their_parameters(files, tmp_path):
    args = (
        "generate",
        "a circle",
        *base_args(files, tmp_path / "a"),
        "--width",
        "64",
        "--height",
        "64",
    )
    plain = written(ldm(*args))[0]
    controls = (
        "--control", str(files["cn"]), "--control-image", str(files["sketch"]),
        "--control", str(files["cn_b"]), "--control-image", str(files["sketch"]),
        "--preprocess", "invert", "--control-weight", "0.7", "--control-weight", "0.5",
        "--control-end", "0.8",
    )  # fmt: skip
    args = (
        "generate",
        "a circle",
        *base_args(files, tmp_path / "b"),
        "--width",
        "64",
        "--height",
        "64",
    )
    (path,) = written(ldm(*args, *controls))
    assert (pixels(path) != pixels(plain)).any()
    extra = parse_parameters(read_parameters(path)).extra
    first, second = extra["ControlNet 0"], extra["ControlNet 1"]
    assert first.startswith("Module: invert, Model: cn-a [")
    assert "Weight: 0.7, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 0.8" in first
    assert "Control Mode: Balanced" in first
    assert "Weight: 0.5" in second and "Module: invert, Model: cn-b [" in second
    proc = ldm("generate", "--from-png", str(path), "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "made with ControlNet 0, ControlNet 1" in proc.stderr


@pytest.mark.parametrize("command", ["img2img", "inpaint", "outpaint"])
def test_image_commands_take_a_controlnet(files, tmp_path, command):
    inputs = {
        "img2img": (str(files["photo"]),),
        "inpaint": (str(files["photo"]), str(files["mask"])),
        "outpaint": (str(files["photo"]),),
    }[command]
    extra = ("--right", "32") if command == "outpaint" else ()
    sketch = files["canvas"] if command == "outpaint" else files["sketch"]
    control = ("--control", str(files["cn"]), "--control-image", str(sketch))
    (path,) = written(
        ldm(command, *inputs, "a circle", *extra, *base_args(files, tmp_path), *control)
    )
    assert pixels(path).shape == ((64, 96, 3) if command == "outpaint" else (64, 64, 3))
    assert "ControlNet 0" in parse_parameters(read_parameters(path)).extra


def test_preprocess_writes_a_canny_map(files, tmp_path):
    target = tmp_path / "map.png"
    (path,) = written(ldm("preprocess", "canny", str(files["sketch"]), "-o", str(target)))
    edges = pixels(path)
    assert path == target and set(edges.flatten().tolist()) <= {0, 255}
    assert edges[..., 0].mean() > 5  # the circle's edges
    proc = ldm("preprocess", "canny", str(files["sketch"]), "-o", str(target), check=False)
    assert proc.returncode != 0 and "exists" in proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--control", "{cn}", "--control-image", "{root}/missing.png"), "control image not found"),
        (("--control", "{cn}", "--control-image", "{wide}"), "of another aspect ratio"),
        (
            ("--control", "{cn}", "--control", "{cn_b}", "--control-image", "{sketch}"),
            "2 --control but 1 --control-image",
        ),
        (
            ("--control", "{cn}", "--control-image", "{sketch}", "--control-weight", "3"),
            "weight must be within [0, 2]",
        ),
        (
            (
                "--control",
                "{cn}",
                "--control-image",
                "{sketch}",
                "--control-start",
                "0.9",
                "--control-end",
                "0.2",
            ),
            "start (0.9) must be before end (0.2)",
        ),  # fmt: skip
        (
            ("--control", "{cn_sdxl}", "--control-image", "{sketch}"),
            "cn-xl.safetensors is a ControlNet for a model with 24-wide text features and a "
            "64-wide size vector, not for this model (a model with 32-wide text features)",
        ),
        (
            ("--control", "{model}", "--control-image", "{sketch}"),
            "is not a ControlNet or T2I-Adapter of a known layout",
        ),
        (
            (
                "--control-image",
                "{sketch}",
            ),
            "--control-image needs --control FILE",
        ),
        (
            ("--control", "{cn}", "--control-image", "{sketch}", "--preprocess", "depth"),
            "unknown preprocessor 'depth'",
        ),
    ],
)
def test_bad_control_input_is_a_one_line_error(files, tmp_path, extra, message):
    extra = tuple(arg.format(**files) for arg in extra)
    out = tmp_path / "out"
    args = ("generate", "a circle", *base_args(files, out), "--width", "64", "--height", "64")
    proc = ldm(*args, *extra, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_info_describes_a_controlnet(files):
    out = ldm("info", str(files["cn"])).stdout
    assert "ControlNet for a model with 32-wide text features (original layout)" in out
    assert "use:         ldm generate PROMPT --control" in out


def test_hires_fix_resizes_the_control_image_for_its_second_pass(files, tmp_path):
    import ldm_cli

    pipe = ldm_cli.load(files["model"], device="cpu", dtype="fp32")
    control = ldm_cli.Control(files["cn"], files["sketch"])
    hires = ldm_cli.HiresFix(scale=2, strength=0.5, upscaler="Lanczos")
    (image,) = pipe.generate(
        "a circle", steps=3, seed=1, width=64, height=64, control=control, hires=hires
    )
    assert image.size == (128, 128)
    assert (
        "ControlNet 0" in image.info["parameters"]
        and "Hires upscale: 2" in image.info["parameters"]
    )
