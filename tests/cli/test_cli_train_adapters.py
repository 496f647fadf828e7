"""`ldm train lora` / `ldm train ti` as a user runs them: on the embedded model, killed with
SIGKILL mid-run and resumed, the LoRA file equals an uninterrupted run's byte for byte; bad
input is one line and writes nothing (a rerun without --resume, changed settings and loading
the files back: tests/training/test_adapter_training.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import ldm, one_thread_per_command  # noqa: F401
from tests.training.test_adapter_training import write_folder

ARGS = ("--steps", "16", "--save-every", "2", "--seed", "3", "--threads", "1", "--rank", "2")


def start(data: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "ldm_cli.cli", "train", "lora", str(data), "-o", str(out)]
    return subprocess.Popen(
        [*command, *ARGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def test_sigkill_then_resume_gives_the_same_file(tmp_path):
    data = write_folder(tmp_path / "data")
    whole = tmp_path / "whole" / "zorp.safetensors"  # the same name: it is in the metadata
    whole.parent.mkdir()
    ldm("train", "lora", str(data), "-o", str(whole), *ARGS)

    cut = tmp_path / "cut" / "zorp.safetensors"
    cut.parent.mkdir()
    process = start(data, cut)
    saved = cut.parent / "zorp.train" / "lora" / "state" / "settings.json"
    deadline = time.monotonic() + 300
    while not saved.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not cut.exists(), "the run ended before it was killed"
    ldm("train", "lora", str(data), "-o", str(cut), *ARGS, "--resume")
    assert cut.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("lora", "{data}", "-o", "{out}", "--rank", "0"), "--rank"),
        (("lora", "{data}", "-o", "{out}", "--format", "onnx"), "--format"),
        (("lora", "{data}", "-o", "{tmp}/x.txt"), ".safetensors or .pt"),
        (("lora", "{tmp}/nowhere", "-o", "{out}"), "does not exist"),
        (("ti", "{data}", "-o", "{out}", "--token", "blorf"), "name the file blorf.safetensors"),
        (("lora", "{data}", "-o", "{out}", "--resume"), "no saved state"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    data = write_folder(tmp_path / "data", count=2)
    out = tmp_path / "a.safetensors"
    values = {"data": str(data), "out": str(out), "tmp": str(tmp_path)}
    proc = ldm("train", *(a.format(**values) for a in args), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists() and not (tmp_path / "a.train").exists()
