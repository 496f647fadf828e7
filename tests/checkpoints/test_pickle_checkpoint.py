"""Pickled checkpoints: refused without --allow-pickle, read weights-only with it, and a pickle
that would run code never runs it."""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.pickled import PickledHeader, allow_pickle
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.models.loading import load_model
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, pixels, written


class RunsShell:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpensFile:
    """Unpickling this creates the marker file through builtins.open."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD 1.x file without ldm metadata, so it is detected from shapes as a pickle is."""
    d = tmp_path_factory.mktemp("pickle")
    return random_checkpoint(TINY_SD1, d / "tiny.safetensors", seed=3, with_metadata=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny):
    """The same weights as a Lightning-style .ckpt: {"state_dict": ..., "global_step": ...}."""
    path = tiny.with_suffix(".ckpt")
    torch.save({"state_dict": load_file(tiny), "global_step": 12, "epoch": 1}, path)
    return path


def _hostile_files(d, marker):
    """Pickles that would create `marker` if anything in them were run."""
    files = {}
    state = {"model.diffusion_model.x": torch.zeros(2)}
    torch.save({"state_dict": state, "hook": RunsShell(marker)}, d / "shell.ckpt")
    files["shell.ckpt"] = d / "shell.ckpt"
    torch.save({"state_dict": {"w": OpensFile(marker)}}, d / "open.pt")
    files["open.pt"] = d / "open.pt"
    torch.save(
        {"state_dict": state, "hook": RunsShell(marker)},
        d / "legacy.pth",
        _use_new_zipfile_serialization=False,
    )
    files["legacy.pth"] = d / "legacy.pth"
    for protocol in (2, pickle.DEFAULT_PROTOCOL):
        path = d / f"raw-{protocol}.bin"
        path.write_bytes(pickle.dumps({"state_dict": RunsShell(marker)}, protocol=protocol))
        files[path.name] = path
    # a torch.save file under a safetensors name: recognised by its bytes, refused alike
    disguised = d / "disguised.safetensors"
    disguised.write_bytes(files["shell.ckpt"].read_bytes())
    files["disguised.safetensors"] = disguised
    return files


def test_the_hostile_pickles_do_run_code_when_loaded_unsafely(tmp_path):
    """Control: the files really would create the marker under a plain torch.load."""
    marker = tmp_path / "marker"
    files = _hostile_files(tmp_path, marker)
    torch.load(files["shell.ckpt"], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allow-pickle"])
def test_code_in_a_pickle_never_runs(tmp_path, allow):
    marker = tmp_path / "marker"
    files = _hostile_files(tmp_path, marker)
    out = tmp_path / "out"
    runs = [
        (name, ["generate", "a cat", "--steps", "1", "--model", str(path), "--out", str(out)])
        for name, path in files.items()
    ]
    runs.append(("shell.ckpt", ["info", str(files["shell.ckpt"])]))
    for name, command in runs:
        args = [*command, "--allow-pickle"] if allow else command
        proc = ldm(*args, check=False)
        detail = f"{name}: {proc.stderr}"
        assert proc.returncode == 2, detail
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), detail
        assert "Traceback" not in proc.stderr, detail
        if allow:
            assert "refused" in lines[0] or "not a readable" in lines[0], detail
        else:
            assert "pickled" in lines[0] and "--allow-pickle" in lines[0], detail
        assert not marker.exists(), f"{name} ran code: {detail}"
    assert not out.exists() or not os.listdir(out)


def test_hostile_pickle_in_process(tmp_path):
    marker = tmp_path / "marker"
    files = _hostile_files(tmp_path, marker)
    for path in files.values():
        with pytest.raises(UserError) as refused:
            read_header(path)
        assert "--allow-pickle" in str(refused.value)
        with allow_pickle(), pytest.raises(UserError) as failed:
            read_header(path)
        assert "\n" not in str(failed.value)
    assert not marker.exists()


def test_allow_pickle_loads_the_same_weights(tiny, tiny_ckpt):
    with pytest.raises(UserError, match="pickled"):
        load_model(tiny_ckpt)
    reference, _ = load_model(tiny)
    with allow_pickle():
        model, header = load_model(tiny_ckpt)
    assert isinstance(header, PickledHeader) and header.metadata == {}
    assert model.config == reference.config  # the same detection from shapes
    theirs = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    # zip checkpoints are memory-mapped, as safetensors files are
    weight = model.unet.out[2].weight
    assert not weight.untyped_storage().resizable()


def test_allow_pickle_is_scoped(tiny_ckpt):
    with allow_pickle():
        read_header(tiny_ckpt)
    with pytest.raises(UserError, match="--allow-pickle"):
        read_header(tiny_ckpt)


def test_plain_state_dict_and_dtypes(tiny, tmp_path):
    """No `state_dict` wrapper, fp16 tensors, and a non-tensor entry beside them."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(tiny).items()}
    path = tmp_path / "plain.pt"
    torch.save({**state, "note": "trained by hand"}, path)
    with allow_pickle():
        header = read_header(path)
        assert "note" not in header.tensors
        key = "model.diffusion_model.out.2.weight"
        info = header.tensors[key]
        assert info.dtype == "F16" and info.shape == tuple(state[key].shape)
        model, _ = load_model(path, dtype=torch.float32)
    assert next(model.unet.parameters()).dtype == torch.float32


def test_lightning_callbacks_are_not_run(tiny, tmp_path, monkeypatch):
    """The original SD checkpoints pickle Lightning's ModelCheckpoint beside the weights: it is
    replaced by an inert stand-in, never imported or called."""
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    calls = []

    class ModelCheckpoint:
        def __init__(self):
            self.best = 1.0

        def __setstate__(self, state):
            calls.append(state)

    ModelCheckpoint.__module__ = module_name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module_name):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[module_name].ModelCheckpoint = ModelCheckpoint
    path = tmp_path / "lightning.ckpt"
    callbacks = {"ModelCheckpoint": ModelCheckpoint()}
    torch.save({"state_dict": load_file(tiny), "callbacks": callbacks}, path)
    monkeypatch.delitem(sys.modules, module_name)
    with allow_pickle():
        header = read_header(path)
    assert "model.diffusion_model.out.2.weight" in header.tensors
    assert calls == []


def test_cli_generate_and_info_with_allow_pickle(tiny, tiny_ckpt, tmp_path):
    common = ["a red circle", "--steps", "2", "--seed", "4", "-W", "64", "-H", "64"]
    (from_pickle,) = written(
        ldm("generate", *common, "--model", str(tiny_ckpt), "--allow-pickle", "-o", str(tmp_path))
    )
    (from_safetensors,) = written(
        ldm("generate", *common, "--model", str(tiny), "-o", str(tmp_path / "s"))
    )
    # The same weights, but the fp32 safetensors ones are used in place at the file's offsets
    # and the unpickled ones in fresh, differently aligned memory, and the CPU kernels may
    # round differently by alignment (seen: one channel of one pixel off by 1/255).
    difference = np.abs(pixels(from_pickle).astype(int) - pixels(from_safetensors).astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    out = ldm("info", str(tiny_ckpt), "--allow-pickle").stdout
    assert "family:      sd1" in out
