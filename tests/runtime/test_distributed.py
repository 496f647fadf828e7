"""`accelerate launch --num_processes 2 ldm generate --prompts-file F` on CPU (gloo): each image
rendered once, by one process, with the names and pixels of a single-process run."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.pngmeta import read_parameters
from ldm_cli.runtime.distributed import Shard
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, pixels, written

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))

PROMPTS = (
    "a red circle\n"
    '--prompt "a cat" --seed 77 --n_iter 3\n'
    "a green star\n"
    '--prompt "a dog" --negative_prompt "blurry" --steps 3 --batch_size 2 --n_iter 2\n'
    "a blue square\n"
)
TOTAL = 1 + 3 + 1 + 4 + 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m ldm_cli`, with no user config and no network."""
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf"),  # no ~/.cache/huggingface/accelerate/default_config.yaml
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    command = [
        ACCELERATE,
        "launch",
        "--multi_gpu",  # the multi-process launcher (torchrun); without GPUs it runs gloo
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "ldm_cli",
        *args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _assert_same(a: Path, b: Path) -> None:
    """Same names and parameters; pixels equal up to one uint8 step here and there, because
    two processes and one process need not sum a matmul in the same order (thread splits,
    batch grouping), and a 1e-7 difference can round a pixel the other way."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        x, y = pixels(a / name).astype(int), pixels(b / name).astype(int)
        diff = np.abs(x - y)
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (name, diff.max(), (diff > 0).mean())
        assert read_parameters(a / name) == read_parameters(b / name), name


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_processes_share_a_prompts_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launched processes run one thread each
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    common = ["--prompts-file", str(prompts), "--model", str(tiny), "--seed", "5"]
    common += ["--steps", "2", "--device", "cpu"]
    single = written(ldm("generate", *common, "--out", str(tmp_path / "one")))
    assert len(single) == TOTAL
    proc = launch(tmp_path, "generate", *common, "--out", str(tmp_path / "two"))
    paths = written(proc)
    assert len(paths) == TOTAL and len(set(paths)) == TOTAL  # each image written once
    _assert_same(tmp_path / "one", tmp_path / "two")

    # resumed by two processes after losing images from both halves
    for path in (paths[0], paths[3], paths[-1]):
        path.unlink()
    resumed = launch(tmp_path, "generate", *common, "--out", str(tmp_path / "two"), "--resume")
    assert sorted(p.name for p in written(resumed)) == sorted(
        p.name for p in (paths[0], paths[3], paths[-1])
    )
    _assert_same(tmp_path / "one", tmp_path / "two")


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_processes_agree_on_a_random_seed(tiny, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "a cat", "-N", "4", "--steps", "1", "--model", str(tiny), "-o", str(out)]
    paths = written(launch(tmp_path, *args))
    names = sorted(p.name for p in paths)
    seeds = [int(re.match(r"\d+-(\d+)-", n).group(1)) for n in names]
    assert [n[:5] for n in names] == ["00001", "00002", "00003", "00004"]
    assert seeds == [seeds[0] + k for k in range(4)]


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_processes_share_a_flow_model_batch(tmp_path, monkeypatch):
    """A FLUX model takes the same sharded path: four images, each written once by one of two
    processes, equal to one process's."""
    from ldm_cli.testing import TINY_FLUX_DEV, random_flow_checkpoint

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flux = random_flow_checkpoint(TINY_FLUX_DEV, tmp_path / "flux.safetensors", seed=3)
    common = ["generate", "a cat", "-N", "4", "--steps", "2", "--seed", "9", "--model", str(flux)]
    common += ["-W", "64", "-H", "64", "--device", "cpu"]
    assert len(written(ldm(*common, "--out", str(tmp_path / "one")))) == 4
    paths = written(launch(tmp_path, *common, "--out", str(tmp_path / "two")))
    assert len(paths) == 4 and len(set(paths)) == 4
    _assert_same(tmp_path / "one", tmp_path / "two")


def test_plain_runs_are_one_shard_without_accelerate():
    code = (
        "import sys\nfrom ldm_cli.runtime.distributed import current\n"
        "print(current(), 'accelerate' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    ).stdout
    assert out.strip() == "Shard(index=0, count=1, state=None) False"


def test_shard_takes_every_nth():
    jobs = list(range(7))
    assert Shard(0, 2).take(jobs) == [0, 2, 4, 6]
    assert Shard(1, 2).take(jobs) == [1, 3, 5]
    assert Shard(2, 3).take(jobs) == [2, 5]
    assert Shard().take(jobs) == jobs and Shard().share(5) == 5


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not installed")
def test_two_process_training_is_one_ddp_run(tmp_path):
    """`accelerate launch ... ldm train` on CPUs: one DDP run (gloo), not two runs that each
    believe they are the main process and write the same files."""
    from dataclasses import replace

    from ldm_cli.checkpoints.detect import config_to_json
    from ldm_cli.data.shapes_writer import write_shapes_dataset
    from ldm_cli.models.loading import load_model

    tiny = TINY_SD1.with_(
        unet=replace(TINY_SD1.unet, model_channels=32, attention_resolutions=(2,)),
        default_size=32,
    )
    data = write_shapes_dataset(tmp_path / "shapes", 32, size=32, seed=0)
    config = tmp_path / "tiny.json"
    config.write_text(config_to_json(tiny))
    run = tmp_path / "run"
    args = ["train", str(data), "--out", str(run), "--config", str(config), "--threads", "1"]
    for stage in ("vae", "text", "unet"):
        args += [f"--{stage}-steps", "4"]
    args += ["--vae-batch-size", "4", "--text-batch-size", "4", "--batch-size", "4"]
    args += ["--log-every", "2", "--sample-every", "0"]
    launch(tmp_path, *args)
    lines = (run / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2, lines  # steps 2 and 4 of each stage, logged by the main process
    model, _ = load_model(run / "model.safetensors")
    assert model.config.default_size == 32


def test_two_process_lora_training_writes_one_file(tmp_path):
    """`accelerate launch ... ldm train lora` on CPUs: the LoRA layers are the DDP module, the
    frozen model sits on each process, and the main process alone writes the file."""
    from safetensors import safe_open

    from tests.training.test_adapter_training import write_folder

    data = write_folder(tmp_path / "data", count=4)
    out = tmp_path / "zorp.safetensors"
    args = ["train", "lora", str(data), "-o", str(out), "--steps", "4", "--batch-size", "2"]
    launch(tmp_path, *args, "--threads", "1", "--rank", "2", "--save-every", "2")
    lines = (tmp_path / "zorp.train" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 4, lines  # one line per step (log every step), from one process
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_steps"] == "4" and len(list(f.keys())) > 0
