"""`ldm convert` and `ldm merge` as a user runs them: bad input is a one-line error with a
non-zero exit that writes nothing; good input prints the file it wrote. (They run through a
runner that registers the two commands when `ldm` does not yet: tests/checkpoint_tools/helpers.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_cli.core.config import TINY_SD1
from ldm_cli.testing import random_checkpoint
from tests.checkpoint_tools.helpers import ldm_tool, write_lora


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    random_checkpoint(TINY_SD1, root / "a.safetensors", seed=1)
    random_checkpoint(TINY_SD1, root / "b.safetensors", seed=2)
    write_lora(root / "ink.safetensors", TINY_SD1, seed=3)
    (root / "taken.safetensors").write_bytes(b"keep me")
    return root


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# the errors found before torch is imported (those found in the files: test_convert, test_merge,
# test_bake, in process)
BAD = [
    (["convert", "missing.safetensors", "o.safetensors"], "IN not found:"),
    (["convert", "a.safetensors", "taken.safetensors"], "taken.safetensors exists already"),
    (["convert", "a.safetensors", "o.safetensors", "--dtype", "fp8"], "unknown --dtype 'fp8'"),
    (["convert", "a.safetensors", "o.ckpt"], "writes .safetensors files"),
    (
        ["convert", "a.safetensors", "o.safetensors", "--lora", "ink.safetensors:strong"],
        "LoRA weight 'strong' in --lora",
    ),
    (
        ["convert", "a.safetensors", "o.safetensors", "--lora", "gone.safetensors:0.5"],
        "gone.safetensors not found",
    ),
    (["convert", "a.safetensors", "o.safetensors", "--vae", "no-vae.pt"], "--vae not found"),
    (["merge", "a.safetensors", "missing.safetensors", "-o", "m.safetensors"], "B not found"),
    (["merge", "a.safetensors", "b.safetensors", "-o", "taken.safetensors"], "exists already"),
    (["merge", "a.safetensors", "b.safetensors", "-o", "m.safetensors", "--dtype", "x"], "--dtype"),
    (
        [
            "merge",
            "a.safetensors",
            "b.safetensors",
            "-o",
            "m.safetensors",
            "--block-weights",
            "1,x",
        ],
        "--block-weights: 'x' is not a number",
    ),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:1] + a[3:]) for a, _ in BAD])
def test_bad_input_is_a_one_line_error_that_writes_nothing(folder, args, message):
    before = listing(folder)
    proc = ldm_tool(*[str(folder / a) if a.endswith((".safetensors", ".pt", ".ckpt")) else a
                      for a in args], check=False)  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert listing(folder) == before


def test_convert_prints_what_it_wrote(folder, tmp_path):
    out = tmp_path / "fp16.safetensors"
    proc = ldm_tool("convert", folder / "a.safetensors", out, "--dtype", "fp16", "--prune",
                    "--lora", f"{folder / 'ink.safetensors'}:0.5")  # fmt: skip
    assert proc.stdout.strip() == str(out)
    assert {t.dtype for t in load_file(str(out)).values()} == {torch.float16, torch.int64}


def test_merge_prints_what_it_wrote(folder, tmp_path, capsys):
    from ldm_cli.cli.merge import merge

    merged = tmp_path / "m.safetensors"
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    merge(a, b, merged, alpha=0.25, add_difference=None, dtype="fp16", block_weights=None)
    assert capsys.readouterr().out.strip() == str(merged)
    a, b, m = (load_file(str(p)) for p in (a, b, merged))
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(m[key], (a[key] * 0.75 + b[key] * 0.25).half())


def test_help_names_every_option():
    convert = ldm_tool("convert", "--help").stdout
    for option in ("--dtype", "--prune", "--ema", "--vae", "--lora", "weights-only"):
        assert option in convert
    merge = ldm_tool("merge", "--help").stdout
    for option in ("--alpha", "--add-difference", "--dtype", "--block-weights", "--out"):
        assert option in merge


def test_the_commands_do_not_import_torch_until_they_run():
    import subprocess
    import sys

    code = (
        "import sys; import ldm_cli.cli.convert, ldm_cli.cli.merge; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
