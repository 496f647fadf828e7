"""`ldm info` and `ldm generate` on FLUX.1 and SD3 files, as a user runs them."""

from __future__ import annotations

import re

import pytest

from ldm_cli.core.flow_config import FLUX_DEV, FLUX_SCHNELL, SD35_MEDIUM
from ldm_cli.testing import (
    TINY_FLUX_DEV,
    TINY_SD1,
    flow_layout,
    random_checkpoint,
    random_flow_checkpoint,
    split_flow_checkpoint,
    write_sparse_checkpoint,
)
from tests.cli_helpers import ldm, one_thread_per_command, pixels, written  # noqa: F401

UNET = "model.diffusion_model."


def parameters(output: str, part: str) -> int:
    match = re.search(rf"^{part}:\s+([\d,]+) parameters", output, re.M)
    assert match, output
    return int(match.group(1).replace(",", ""))


@pytest.mark.parametrize(
    "cfg, name, count",
    [
        (FLUX_DEV, "FLUX.1 [dev]", 11_901_408_320),
        (FLUX_SCHNELL, "FLUX.1 [schnell]", 11_891_178_560),
    ],
)
def test_info_names_full_size_flux(tmp_path, cfg, name, count):
    """Black Forest Labs' transformer-only file (23.8 GB in bf16; here its header over a
    sparse hole), recognised from its 780 (dev) tensors' shapes alone."""
    shapes = {k.removeprefix(UNET): v for k, v in flow_layout(cfg).items()}
    assert len(shapes) == (780 if cfg.transformer.guidance_embed else 776)
    path = write_sparse_checkpoint(tmp_path / "flux1.safetensors", shapes)
    out = ldm("info", str(path)).stdout
    assert f"({name})" in out
    assert parameters(out, "transformer") == count
    assert "needs:       --vae FILE --clip-l FILE --t5 FILE" in out
    seconds = float(re.search(r"meta device in ([\d.]+) s", out).group(1))
    assert seconds < 30


def test_info_names_full_size_sd35_medium(tmp_path):
    """The all-in-one file with both CLIPs and T5-XXL (MMDiT-X: dual attention in blocks
    0-12, qk RMSNorm; the 384x384 position table counts 226.5 M of its 2.47 B)."""
    shapes = flow_layout(SD35_MEDIUM, ("model", "vae", "text"))
    path = write_sparse_checkpoint(tmp_path / "sd3.5_medium.safetensors", shapes, "F16")
    out = ldm("info", str(path)).stdout
    assert "(Stable Diffusion 3.5 Medium)" in out
    assert parameters(out, "transformer") == 2_469_663_936
    assert parameters(out, "t5") == 4_762_310_656
    assert "needs:" not in out


def test_bare_transformer_needs_its_parts(tmp_path):
    files = split_flow_checkpoint(
        random_flow_checkpoint(TINY_FLUX_DEV, tmp_path / "all.safetensors"), tmp_path
    )
    proc = ldm("generate", "x", "--model", str(files["model"]), "-o", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "give them with --vae FILE and --clip-l FILE and --t5 FILE" in proc.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture(scope="module")
def flux_parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    all_in_one = random_flow_checkpoint(TINY_FLUX_DEV, folder / "all.safetensors", seed=2)
    return {"all": all_in_one, **split_flow_checkpoint(all_in_one, folder)}


def test_generate_from_separate_files_and_back_from_png(flux_parts, tmp_path):
    parts = ["--vae", str(flux_parts["vae"]), "--clip-l", str(flux_parts["clip_l"])]
    parts += ["--t5", str(flux_parts["t5"])]
    common = ["-W", "64", "-H", "64", "--steps", "3", "--seed", "5", "-o", str(tmp_path)]
    first = written(ldm("generate", "a red square", "--model", str(flux_parts["model"]),
                        *parts, *common, "--guidance", "4"))  # fmt: skip
    (png,) = first
    from ldm_cli.core.pngmeta import read_parameters

    text = read_parameters(png)
    assert "Sampler: Euler" in text and "Distilled CFG Scale: 4" in text
    again = written(ldm("generate", "--from-png", str(png), "--model", str(flux_parts["all"]),
                        "-o", str(tmp_path / "again")))  # fmt: skip
    # the same weights from other files: a tensor's alignment in its memory-mapped file can
    # change a matmul's summation order (~2e-6), which rounds the odd pixel the other way
    diff = abs(pixels(again[0]).astype(int) - pixels(png).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_flow_options_refused_where_they_do_not_apply(flux_parts, tmp_path):
    sd = random_checkpoint(TINY_SD1, tmp_path / "sd.safetensors")
    cases = [
        (["--model", str(sd), "--guidance", "3"], "--guidance is FLUX dev's distilled guidance"),
        (["--model", str(sd), "--t5", str(flux_parts["t5"])], "--t5: separate text encoder files"),
        (["--model", str(flux_parts["all"]), "--sampler", "ddim"], "does not run flow"),
        (["--model", str(flux_parts["all"]), "--t5", str(flux_parts["vae"])], "--t5 vae"),
    ]
    for options, message in cases:
        proc = ldm("generate", "x", *options, "-W", "64", "-H", "64", "--steps", "1",
                   "-o", str(tmp_path / "out"), check=False)  # fmt: skip
        assert proc.returncode != 0, options
        assert message in proc.stderr, (options, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_prompts_file_and_resume_on_a_flow_model(flux_parts, tmp_path):
    """A FLUX prompts file (per-line options, a batch of two), one image deleted, `--resume`
    renders just it again with the pixels and parameters of the whole run."""
    from tests.cli.test_batch_resume import assert_same_files

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a blue square\n"
        '--prompt "a cat" --seed 77 --batch_size 2 --guidance 5\n'
        "a green star --steps 2\n"
    )
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = ["generate", "--prompts-file", str(prompts), "--steps", "3", "--seed", "5"]
    args += ["--model", str(flux_parts["all"]), "-W", "64", "-H", "64"]
    first = written(ldm(*args, "--out", str(whole)))
    assert len(first) == 4
    from ldm_cli.core.pngmeta import read_parameters

    assert "Distilled CFG Scale: 5" in read_parameters(first[1])
    ldm(*args, "--out", str(out))
    (out / first[2].name).unlink()  # the second image of the batch
    resumed = ldm(*args, "--out", str(out), "--resume")
    assert [p.name for p in written(resumed)] == [first[2].name]
    assert_same_files(out, whole)


def test_image_modes_from_the_command_line_on_a_flow_model(flux_parts, tmp_path):
    """img2img keeps the size; inpaint and outpaint keep the input's pixels where the blurred
    mask is 0 (outpaint's canvas grows)."""
    import numpy as np
    from PIL import Image

    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)
    common = ["--model", str(flux_parts["all"]), "--steps", "3", "--seed", "2"]
    (grown,) = written(ldm("outpaint", str(photo), "a field", "--right", "32", *common,
                           "--out", str(tmp_path / "o")))  # fmt: skip
    image = pixels(grown)
    assert image.shape == (64, 96, 3)
    assert np.array_equal(image[:, :16], pixels(photo)[:, :16])  # far from the new border
    assert image[:, 72:].std() > 0  # painted, not left as repeated edge pixels
    (changed,) = written(ldm("img2img", str(photo), "a field", "--strength", "0.6", *common,
                             "--out", str(tmp_path / "i")))  # fmt: skip
    assert pixels(changed).shape == (64, 64, 3)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (painted,) = written(ldm("inpaint", str(photo), str(tmp_path / "mask.png"), "a field",
                             *common, "--out", str(tmp_path / "p")))  # fmt: skip
    from ldm_cli.core.image_inputs import blur_mask

    keep = blur_mask(Image.open(tmp_path / "mask.png"), 4) == 0
    assert keep.sum() > 1000
    assert np.array_equal(pixels(painted)[keep], pixels(photo)[keep])
    assert not np.array_equal(pixels(painted)[24:40, 24:40], pixels(photo)[24:40, 24:40])
