"""`--offload`: option checks, accelerate's wiring, and offloaded runs equal plain ones.

No GPU is available here, so offloaded pipelines run with the CPU as the execution device:
the hooks, the meta-device weights of `sequential` and the weight maps all take effect; only
the copies between devices are trivial.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.config import TINY_SD1, TINY_SDXL
from ldm_cli.core.errors import UserError
from ldm_cli.ops import channels_last
from ldm_cli.runtime.offload import PRELOAD_CLASSES, apply_offload, check_offload_device
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm

CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    return {
        "sd1": random_checkpoint(TINY_SD1, folder / "sd1.safetensors", seed=3),
        "sdxl": random_checkpoint(TINY_SDXL, folder / "sdxl.safetensors", seed=3),
    }


def test_offload_on_a_cpu_device_is_a_one_line_error(tmp_path):
    proc = ldm("generate", "a cat", "--offload", "model", "--device", "cpu", check=False)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: --offload model needs a CUDA device: on cpu the weights already live in CPU "
        "memory, so there is nothing to offload to\n"
    )
    with pytest.raises(UserError, match="--offload sequential needs a CUDA device"):
        check_offload_device("sequential", torch.device("cpu"))
    check_offload_device("none", torch.device("cpu"))


@pytest.mark.parametrize("command", [["generate", "a cat"], ["inpaint", "i.png", "m.png", "x"]])
def test_unknown_offload_mode_is_refused_before_loading(command, tmp_path):
    proc = ldm(*command, "--offload", "half", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr == "error: unknown --offload 'half'; use none, model, sequential\n"


def test_load_refuses_offload_on_cpu(checkpoints):
    with pytest.raises(UserError, match="nothing to offload to"):
        ldm_cli.load(checkpoints["sd1"], device="cpu", offload="model")


class Recorder:
    """Stand-ins for accelerate's functions that record what they were given."""

    def __init__(self):
        self.with_hook, self.sequential = [], []

    def cpu_offload_with_hook(self, model, execution_device=None, prev_module_hook=None):
        hook = type("Hook", (), {})()
        hook.model = model
        hook.hook = type("CpuOffload", (), {"prev_module_hook": prev_module_hook})()
        self.with_hook.append((model, execution_device, prev_module_hook, hook))
        return model, hook

    def cpu_offload(self, model, execution_device=None, preload_module_classes=None, **_):
        self.sequential.append((model, execution_device, preload_module_classes))
        return model


@pytest.fixture()
def recorder(monkeypatch):
    import accelerate

    rec = Recorder()
    monkeypatch.setattr(accelerate, "cpu_offload_with_hook", rec.cpu_offload_with_hook)
    monkeypatch.setattr(accelerate, "cpu_offload", rec.cpu_offload)
    return rec


def test_model_offload_chains_the_components(checkpoints, recorder):
    model = ldm_cli.load(checkpoints["sd1"], device="cpu").model
    apply_offload(model, "model", CUDA)
    parts = [m for m, *_ in recorder.with_hook]
    assert parts == [model.text_encoder, model.unet, model.vae]
    assert all(device == CUDA for _, device, _, _ in recorder.with_hook)
    hooks = [hook for *_, hook in recorder.with_hook]
    assert [prev for _, _, prev, _ in recorder.with_hook] == [None, hooks[0], hooks[1]]
    assert hooks[0].hook.prev_module_hook is hooks[2]  # the next run's text encoder sends it back
    assert recorder.sequential == []


def test_sequential_offload_goes_layer_by_layer_through_unet_and_vae(checkpoints, recorder):
    model = ldm_cli.load(checkpoints["sd1"], device="cpu").model
    apply_offload(model, "sequential", CUDA)
    assert [m for m, *_ in recorder.sequential] == [model.unet, model.vae]
    assert all(d == CUDA and p == PRELOAD_CLASSES for _, d, p in recorder.sequential)
    assert [m for m, *_ in recorder.with_hook] == [model.text_encoder]  # whole, once per batch


def test_vae_decode_brings_the_vae_although_it_bypasses_forward(checkpoints):
    """With the meta device as the 'GPU', a move is visible as weights turning meta."""
    pipe = ldm_cli.load(checkpoints["sd1"], device="cpu")
    apply_offload(pipe.model, "model", torch.device("meta"))
    assert not next(pipe.vae.parameters()).is_meta
    pipe.vae.decode(torch.zeros(1, 4, 8, 8, device="meta"))  # decode, not forward
    assert next(pipe.vae.parameters()).is_meta
    assert not next(pipe.unet.parameters()).is_meta


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloaded_pipeline_renders_the_same_image(checkpoints, family, mode, monkeypatch):
    # Offloaded weights arrive layer by layer, so the decoder never goes channels-last
    # (ldm_cli.ops.channels_last); the plain run keeps NCHW too, for the same bits.
    monkeypatch.setattr(channels_last, "default_layout", lambda: "nchw")
    plain = ldm_cli.load(checkpoints[family], device="cpu")
    expected = np.asarray(plain.generate("a cat", steps=2, seed=1, sampler="euler")[0])
    pipe = ldm_cli.load(checkpoints[family], device="cpu")
    apply_offload(pipe.model, mode, torch.device("cpu"))
    if mode == "sequential":  # the weights live in accelerate's maps, not in the modules
        assert next(pipe.unet.parameters()).is_meta and next(pipe.vae.parameters()).is_meta
    image = np.asarray(pipe.generate("a cat", steps=2, seed=1, sampler="euler")[0])
    assert np.array_equal(image, expected)
    if family == "sd1":  # img2img encodes through the VAE first
        start = plain.generate("a dog", steps=1, seed=2, sampler="euler")[0]
        options = {"strength": 0.5, "steps": 2, "seed": 3, "sampler": "euler"}
        want = np.asarray(plain.img2img(start, "a cat", **options)[0])
        assert np.array_equal(np.asarray(pipe.img2img(start, "a cat", **options)[0]), want)


def test_lora_under_sequential_offload_is_refused(checkpoints, tmp_path):
    """The U-Net's weights are meta tensors then; patching them would silently do nothing."""
    from safetensors.torch import save_file

    from ldm_cli.networks.keys import layer_table

    pipe = ldm_cli.load(checkpoints["sd1"], device="cpu")
    params = dict(pipe.model.named_parameters())
    name, target = next(
        (n, t)
        for n, t in layer_table(pipe.model).items()
        if n.startswith("lora_unet_") and t.rows is None and params[t.param].ndim == 2
    )
    out_dim, in_dim = params[target.param].shape
    lora = tmp_path / "one.safetensors"
    save_file(
        {
            f"{name}.lora_down.weight": torch.ones(2, in_dim),
            f"{name}.lora_up.weight": torch.ones(out_dim, 2),
        },
        str(lora),
    )
    apply_offload(pipe.model, "sequential", torch.device("cpu"))
    pipe.networks.add_lora(lora, 1.0)
    with pytest.raises(UserError, match="cannot be applied with --offload sequential"):
        pipe.generate("a cat", steps=1, seed=1)
