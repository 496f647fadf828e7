"""A corpus of user mistakes through the `ldm` command, each run in a subprocess.

Every case must end with exactly one line on stderr (`error: ...` naming the problem), a
non-zero exit status (2 for usage errors), no traceback, and nothing written in the output
folder (not even a hidden temporary file).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.embedded import DEFAULT_NAME, WEIGHTS_DIR
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every bad (and the few good) input files the cases below name."""
    d = tmp_path_factory.mktemp("inputs")
    tiny = random_checkpoint(TINY_SD1, d / "tiny.safetensors", seed=5)
    data = tiny.read_bytes()
    state = load_file(tiny)
    f: dict[str, Path] = {"tiny": tiny}

    def raw(name: str, content: bytes) -> None:
        f[name] = d / name
        f[name].write_bytes(content)

    def header(name: str, entries: dict, payload: bytes) -> None:
        text = json.dumps(entries).encode()
        raw(name, struct.pack("<Q", len(text)) + text + payload)

    def entry(dtype: str, shape: list, offsets: list) -> dict:
        return {"a": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}

    raw("empty.safetensors", b"")
    raw("notes.safetensors", b"hello, this is not a checkpoint at all\n")
    raw("truncated.safetensors", data[: len(data) // 2])
    raw("huge-header.safetensors", struct.pack("<Q", 10**12) + b"{}")
    raw("header-past-end.safetensors", struct.pack("<Q", 4000) + b"{}")
    raw("not-json.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{]")
    header("array.safetensors", [1, 2], b"")  # type: ignore[arg-type]
    header("outside.safetensors", entry("F32", [4], [0, 16]), b"\0" * 8)
    header("backwards.safetensors", entry("F32", [1], [8, 4]), b"\0" * 8)
    header("bad-dtype.safetensors", entry("Q9", [1], [0, 4]), b"\0" * 4)
    header("mismatch.safetensors", entry("F32", [3], [0, 4]), b"\0" * 4)
    header("negative.safetensors", entry("F32", [-1], [0, 4]), b"\0" * 4)
    header("malformed.safetensors", {"a": {"dtype": "F32", "shape": "x"}}, b"")
    header("no-tensors.safetensors", {"__metadata__": {"a": "b"}}, b"")
    f["picture.safetensors"] = d / "picture.safetensors"
    Image.new("RGB", (8, 8)).save(f["picture.safetensors"], format="PNG")
    f["other.safetensors"] = d / "other.safetensors"
    save_file({"classifier.weight": torch.zeros(3, 4)}, f["other.safetensors"])
    f["sdxl.safetensors"] = d / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.x": torch.zeros(2)}, f["sdxl.safetensors"])
    missing = {k: v for k, v in state.items() if not k.endswith("attn1.to_q.weight")}
    f["missing-tensors.safetensors"] = d / "missing-tensors.safetensors"
    save_file(missing, f["missing-tensors.safetensors"])
    wrong = dict(state)
    key = "model.diffusion_model.out.2.bias"
    wrong[key] = torch.zeros(wrong[key].shape[0] + 1)
    f["wrong-shape.safetensors"] = d / "wrong-shape.safetensors"
    save_file(wrong, f["wrong-shape.safetensors"])
    torch.save({"state_dict": state}, d / "model.ckpt")
    f["model.ckpt"] = d / "model.ckpt"
    raw("garbage.ckpt", b"\x80\x02this is not a pickle" * 4)
    f["folder.safetensors"] = d / "folder.safetensors"
    f["folder.safetensors"].mkdir()
    # the embedded model's widths (GroupNorm over 24 channels) without its ldm_config
    f["no-config.safetensors"] = d / "no-config.safetensors"
    save_file(load_file(WEIGHTS_DIR / DEFAULT_NAME), f["no-config.safetensors"])
    with safe_open(str(tiny), "pt") as handle:
        config = json.loads(handle.metadata()["ldm_config"])
    for name, change in [
        ("bad-prediction", {"prediction": "zzz"}),
        ("bad-family", {"family": "sd99"}),
        ("bad-betas", {"schedule": {"beta_start": "a"}}),
        ("bad-size", {"default_size": -5}),
    ]:
        f[f"{name}.safetensors"] = d / f"{name}.safetensors"
        save_file(state, f[f"{name}.safetensors"], {"ldm_config": json.dumps({**config, **change})})
    raw("unreadable.safetensors", data[:64])
    f["unreadable.safetensors"].chmod(0)

    raw("empty.txt", b"")
    raw("comments.txt", b"# only a comment\n\n   \n# and another\n")
    raw("bad-option.txt", b"a cat\n--prompt 'a dog' --bogus 3\n")
    raw("bad-steps.txt", b"--prompt 'a dog' --steps many\n")
    raw("quote.txt", b"--prompt 'a dog\n")
    raw("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"))
    raw("no-prompt.txt", b"--steps 3\n")
    image = d / "image.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    f["image.png"] = image
    f["small-mask.png"] = d / "small-mask.png"
    Image.new("L", (32, 32), 255).save(f["small-mask.png"])
    f["black-mask.png"] = d / "black-mask.png"
    Image.new("L", (64, 64), 0).save(f["black-mask.png"])
    f["no-params.png"] = image
    bad_params = PngImagePlugin.PngInfo()
    bad_params.add_text("parameters", "a cat\nSteps: lots, Seed: x")
    f["bad-params.png"] = d / "bad-params.png"
    Image.new("RGB", (64, 64)).save(f["bad-params.png"], pnginfo=bad_params)
    raw("not-an-image.png", b"GIF89a? no, just text")
    raw("a-file", b"I am a file, not a folder\n")
    return f


def run_bad(args: list[str], out: Path) -> tuple[str, int]:
    """Run `ldm *args`; check the one-line error and the empty output; (the line, status)."""
    proc = ldm(*args, check=False)
    detail = f"ldm {' '.join(args)}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.returncode != 0, detail
    assert "Traceback" not in proc.stderr, detail
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, detail
    assert lines[0].startswith("error: "), detail
    if out.is_dir():
        assert sorted(os.listdir(out)) == [], detail
    return lines[0], proc.returncode


def _args(template: list[str], files: dict[str, Path], out: Path) -> list[str]:
    """`@name` is a file of the corpus; `OUT` the output folder; `MISSING` a missing path;
    `UNDER_FILE` a folder inside a plain file."""
    result = []
    for word in template:
        if word.startswith("@"):
            result.append(str(files[word[1:]]))
        elif word == "OUT":
            result.append(str(out))
        elif word == "UNDER_FILE":
            result.append(str(files["a-file"] / "sub"))
        elif word == "MISSING":
            result.append(str(out.parent / "does-not-exist.safetensors"))
        else:
            result.append(word)
    return result


GEN = ["generate", "a red circle", "--steps", "1", "--seed", "1", "--out", "OUT"]

# (case id, arguments, words the message must hold, exit status)
CHECKPOINTS = [
    ("missing", ["--model", "MISSING"], ["not found"], 2),
    ("directory", ["--model", "@folder.safetensors"], ["directory"], 2),
    ("empty", ["--model", "@empty.safetensors"], ["not a safetensors file", "too short"], 2),
    ("text-file", ["--model", "@notes.safetensors"], ["not a safetensors file"], 2),
    ("png-file", ["--model", "@picture.safetensors"], ["not a safetensors file"], 2),
    ("truncated", ["--model", "@truncated.safetensors"], ["truncated"], 2),
    ("header-size-bound", ["--model", "@huge-header.safetensors"], ["header size"], 2),
    ("header-past-end", ["--model", "@header-past-end.safetensors"], ["header size"], 2),
    ("header-not-json", ["--model", "@not-json.safetensors"], ["not JSON"], 2),
    ("header-not-object", ["--model", "@array.safetensors"], ["not a JSON object"], 2),
    ("offsets-outside", ["--model", "@outside.safetensors"], ["outside the file"], 2),
    ("offsets-backwards", ["--model", "@backwards.safetensors"], ["outside the file"], 2),
    ("bad-dtype", ["--model", "@bad-dtype.safetensors"], ["unsupported dtype", "Q9"], 2),
    ("shape-size-mismatch", ["--model", "@mismatch.safetensors"], ["does not match"], 2),
    ("negative-dim", ["--model", "@negative.safetensors"], ["negative dimension"], 2),
    ("malformed-entry", ["--model", "@malformed.safetensors"], ["malformed"], 2),
    ("no-tensors", ["--model", "@no-tensors.safetensors"], ["no tensors"], 2),
    ("unknown-architecture", ["--model", "@other.safetensors"], ["not a Stable Diffusion"], 2),
    ("sdxl", ["--model", "@sdxl.safetensors"], ["SDXL"], 2),
    ("missing-tensors", ["--model", "@missing-tensors.safetensors"], ["missing tensors"], 2),
    ("wrong-shape", ["--model", "@wrong-shape.safetensors"], ["wrong shape", "out.2.bias"], 2),
    ("pickle-refused", ["--model", "@model.ckpt"], ["pickled", "--allow-pickle"], 2),
    (
        "pickle-corrupt",
        ["--model", "@garbage.ckpt", "--allow-pickle"],
        ["not a readable PyTorch checkpoint"],
        2,
    ),
    (
        "no-config-tiny-widths",
        ["--model", "@no-config.safetensors"],
        ["num_groups", "ldm_config"],
        2,
    ),
    ("config-prediction", ["--model", "@bad-prediction.safetensors"], ["prediction", "zzz"], 2),
    ("config-family", ["--model", "@bad-family.safetensors"], ["unknown family", "sd99"], 2),
    ("config-betas", ["--model", "@bad-betas.safetensors"], ["betas"], 2),
    ("config-size", ["--model", "@bad-size.safetensors"], ["default_size", "-5"], 2),
]

OPTIONS = [
    ("steps-zero", ["--steps", "0"], ["--steps"], 2),
    ("steps-not-a-number", ["--steps", "many"], ["--steps", "integer"], 2),
    ("unknown-option", ["--bogus"], ["--bogus"], 2),
    ("option-without-value", ["--cfg"], ["--cfg"], 2),
    ("unknown-sampler", ["--sampler", "nope"], ["unknown sampler"], 2),
    ("unknown-scheduler", ["--scheduler", "nope"], ["unknown scheduler"], 2),
    ("zero-images", ["-N", "0"], ["--num-images"], 2),
    ("zero-batch", ["-b", "0"], ["--batch-size"], 2),
    ("width-not-multiple", ["--width", "70"], ["multiples of"], 2),
    ("width-negative", ["--width", "-64"], ["--width", "between 1 and 16384"], 2),
    ("width-zero", ["--width", "0"], ["--width", "between 1 and 16384"], 2),
    ("height-huge", ["-H", str(2**70)], ["--height", "between 1 and 16384"], 2),
    ("steps-huge", ["--steps", str(10**20)], ["--steps", "between 1 and 10000"], 2),
    ("seed-negative", ["--seed", "-2"], ["--seed", "between 0 and 2**64-1"], 2),
    ("seed-too-big", ["--seed", str(2**64)], ["--seed", "between 0 and 2**64-1"], 2),
    ("seed-plus-images", ["--seed", str(2**64 - 1), "-N", "2"], ["with 2 images"], 2),
    ("many-images", ["-N", str(10**8)], ["--num-images", "between 1 and 100000"], 2),
    ("leading-1000-steps", ["--sampler", "ddpm", "--steps", "1000"], ["at most 999 steps"], 2),
    ("hires-steps-alone", ["--hires-steps", "5"], ["--hires-steps need --hires-scale"], 2),
    ("refiner-switch-alone", ["--refiner-switch", "0.5"], ["--refiner-switch needs --refiner"], 2),
    ("hires-scale-huge", ["--hires-scale", "1000"], ["--hires-scale must be from 1 to 8"], 2),
    ("hires-scale-shrinks", ["--hires-scale", "0.5"], ["--hires-scale must be from 1 to 8"], 2),
    ("hires-steps-huge", ["--hires-scale", "2", "--hires-steps", str(2**70)], ["--hires-steps"], 2),
    ("unknown-device", ["--device", "quantum"], ["--device"], 2),
    ("unknown-dtype", ["--dtype", "fp8"], ["--dtype"], 2),
    ("cfg-nan", ["--cfg", "nan"], ["--cfg", "finite"], 2),
    ("cfg-inf", ["--cfg", "inf"], ["--cfg", "finite"], 2),
    ("hires-scale", ["--hires-scale", "-1"], ["--hires-scale"], 2),
    ("hires-strength", ["--hires-scale", "2", "--hires-strength", "2"], ["--hires-strength"], 2),
    ("prediction", ["--prediction", "x0"], ["--prediction"], 2),
    ("clip-skip-zero", ["--clip-skip", "0"], ["--clip-skip"], 2),
    ("clip-skip-too-deep", ["--clip-skip", "99"], ["--clip-skip"], 2),
]

OUTPUTS = [
    ("out-is-a-file", ["--out", "@a-file"], ["not a directory"], 2),
    ("out-under-a-file", ["--out", "UNDER_FILE"], ["not a directory"], 2),
]


def _cases():
    for case, extra, needles, status in CHECKPOINTS:
        yield pytest.param([*GEN, *extra], needles, status, id=f"checkpoint-{case}")
    for case, extra, needles, status in OPTIONS:
        yield pytest.param([*GEN, "--model", "@tiny", *extra], needles, status, id=case)
    for case, extra, needles, status in OUTPUTS:
        yield pytest.param([*GEN, "--model", "@tiny", *extra], needles, status, id=case)
    prompts = ["generate", "--model", "@tiny", "--seed", "1", "--out", "OUT", "--prompts-file"]
    for case, name, needles in [
        ("empty", "@empty.txt", ["no prompts"]),
        ("only-comments", "@comments.txt", ["no prompts"]),
        ("missing", "MISSING", ["cannot read prompts file"]),
        ("directory", "@folder.safetensors", ["cannot read prompts file"]),
        ("unknown-option", "@bad-option.txt", ["bad-option.txt:2", "--bogus"]),
        ("bad-value", "@bad-steps.txt", ["bad-steps.txt:1", "--steps"]),
        ("unterminated-quote", "@quote.txt", ["quote.txt:1", "quote"]),
        ("not-utf8", "@latin1.txt", ["latin1.txt:1", "UTF-8"]),
        ("no-prompt", "@no-prompt.txt", ["no-prompt.txt:1", "no --prompt"]),
    ]:
        yield pytest.param([*prompts, name], needles, 2, id=f"prompts-file-{case}")
    yield pytest.param(
        ["generate", "a", "--prompts-file", "@empty.txt", "--out", "OUT"],
        ["exactly one of"],
        2,
        id="prompt-and-prompts-file",
    )
    yield pytest.param(["generate", "--out", "OUT"], ["exactly one of"], 2, id="no-prompt")
    yield pytest.param(
        ["generate", "a cat", "--model", "@tiny", "--resume", "--out", "OUT"],
        ["--resume", "--seed"],
        2,
        id="resume-without-seed",
    )
    png = ["generate", "--model", "@tiny", "--out", "OUT", "--from-png"]
    yield pytest.param([*png, "MISSING"], ["cannot read image"], 2, id="from-png-missing")
    yield pytest.param([*png, "@not-an-image.png"], ["cannot read image"], 2, id="from-png-junk")
    yield pytest.param([*png, "@no-params.png"], ["parameters"], 2, id="from-png-no-parameters")
    yield pytest.param([*png, "@bad-params.png"], ["Steps"], 2, id="from-png-bad-parameters")
    image = ["--model", "@tiny", "--steps", "1", "--out", "OUT"]
    yield pytest.param(
        ["img2img", "MISSING", "a cat", *image], ["not found"], 2, id="img2img-missing-image"
    )
    yield pytest.param(
        ["img2img", "@not-an-image.png", "a cat", *image],
        ["cannot read image"],
        2,
        id="img2img-not-an-image",
    )
    yield pytest.param(
        ["img2img", "@image.png", "a cat", "--strength", "2", *image],
        ["--strength"],
        2,
        id="img2img-strength",
    )
    yield pytest.param(
        ["inpaint", "@image.png", "@small-mask.png", "a cat", *image],
        ["mask is 32x32", "image is 64x64"],
        2,
        id="inpaint-mask-size",
    )
    yield pytest.param(
        ["inpaint", "@image.png", "@black-mask.png", "a cat", *image],
        ["mask is empty"],
        2,
        id="inpaint-empty-mask",
    )
    yield pytest.param(
        ["outpaint", "@image.png", "a cat", *image], ["--left"], 2, id="outpaint-nothing"
    )
    yield pytest.param(
        ["outpaint", "@image.png", "a cat", "--left", str(10**23), *image],
        ["outpainted canvas", "at most 16384"],
        2,
        id="outpaint-huge",
    )
    yield pytest.param(
        ["inpaint", "@image.png", "@black-mask.png", "a cat", "--mask-blur", str(2**70), *image],
        ["--mask-blur", "between 0 and 256"],
        2,
        id="inpaint-mask-blur-huge",
    )
    yield pytest.param(
        ["img2img", "@image.png", "a cat", "--seed", str(2**64), *image],
        ["--seed", "between 0 and 2**64-1"],
        2,
        id="img2img-seed-too-big",
    )
    yield pytest.param(
        ["img2img", "@image.png", "a cat", "--model", "@model.ckpt", "--out", "OUT"],
        ["pickled", "--allow-pickle"],
        2,
        id="img2img-pickle-refused",
    )
    for case, name, needles in [
        ("missing", "MISSING", ["not found"]),
        ("truncated", "@truncated.safetensors", ["truncated"]),
        ("unknown-architecture", "@other.safetensors", ["not a Stable Diffusion"]),
        ("pickle-refused", "@model.ckpt", ["pickled", "--allow-pickle"]),
        ("tensors-unfit", "@no-config.safetensors", ["does not match", "num_groups"]),
        ("wrong-shape", "@wrong-shape.safetensors", ["wrong shape", "out.2.bias"]),
    ]:
        yield pytest.param(["info", name], needles, 2, id=f"info-{case}")
    yield pytest.param(["nosuchcommand"], ["nosuchcommand"], 2, id="unknown-command")
    for case, args, needles in [
        (
            "dataset-into-a-file",
            ["dataset", "shapes", "@a-file", "--num", "2"],
            ["not a directory"],
        ),
        (
            "train-into-a-file",
            ["train", "model", "@folder.safetensors", "-o", "@a-file"],
            ["not a directory"],
        ),
        (
            "train-seed",
            ["train", "model", "@folder.safetensors", "-o", "OUT", "--seed", "-3"],
            ["--seed"],
        ),
        (
            "train-upscaler-scale",
            ["train", "upscaler", "-o", "OUT", "--scale", "3"],
            ["--scale must be 2 or 4"],
        ),
        ("eval-json-exists", ["eval", "--num", "1", "--json", "@a-file"], ["is a file already"]),
        (
            "eval-json-under-file",
            ["eval", "--num", "1", "--json", "UNDER_FILE"],
            ["not a directory"],
        ),
        (
            "eval-clip-tower-junk",
            ["eval", "--num", "1", "--steps", "1", "--clip-tower", "@notes.safetensors"],
            ["is not a CLIP tower"],
        ),
    ]:
        yield pytest.param(args, needles, 2, id=case)


@pytest.mark.parametrize("template, needles, status", list(_cases()))
def test_bad_input_gives_one_line_and_writes_nothing(files, tmp_path, template, needles, status):
    out = tmp_path / "out"
    line, returncode = run_bad(_args(template, files, out), out)
    for needle in needles:
        assert needle in line, line
    assert returncode == status, line
    assert files["a-file"].read_text() == "I am a file, not a folder\n"


@pytest.mark.skipif(IS_ROOT, reason="root reads and writes regardless of permissions")
def test_unreadable_checkpoint(files, tmp_path):
    out = tmp_path / "out"
    args = [*_args(GEN, files, out), "--model", str(files["unreadable.safetensors"])]
    line, _ = run_bad(args, out)
    assert "permission denied" in line


@pytest.mark.skipif(IS_ROOT, reason="root reads and writes regardless of permissions")
def test_unwritable_output_folder(files, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        line, _ = run_bad([*_args(GEN, files, out), "--model", str(files["tiny"])], out)
    finally:
        out.chmod(0o700)
    assert "not writable" in line


def test_debug_shows_the_traceback(files, tmp_path):
    proc = ldm(
        "--debug", "generate", "x", "--model", str(files["truncated.safetensors"]), check=False
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "truncated" in proc.stderr


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    """The CPU allocator's RuntimeError and torch.OutOfMemoryError become one line, exit 1."""
    from ldm_cli import cli
    from ldm_cli.cli import usage as cli_usage

    for error in (
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ):

        def boom(app, error=error):
            raise error

        monkeypatch.setattr(cli_usage, "run_app", boom)
        monkeypatch.setattr(sys, "argv", ["ldm", "generate", "x"])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: out of memory"), err


def test_other_runtime_errors_are_not_hidden(monkeypatch):
    from ldm_cli import cli
    from ldm_cli.cli import usage as cli_usage

    def boom(app):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli_usage, "run_app", boom)
    with pytest.raises(RuntimeError, match="internal bug"):
        cli.main()
