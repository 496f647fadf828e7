"""`ldm train controlnet`: a few steps on a small shapes set for the embedded model give a file
in the original layout that `--control` loads; the start is the model unchanged."""

from __future__ import annotations

import torch

from ldm_cli.control.files import read_control_file
from ldm_cli.data.shapes_writer import write_shapes_dataset
from tests.cli_helpers import ldm, one_thread_per_command, written  # noqa: F401


def test_a_short_run_writes_a_controlnet_that_generate_loads(tmp_path):
    data = write_shapes_dataset(tmp_path / "data", 24, size=64, seed=5, layout="free")
    run = tmp_path / "run"
    args = ("train", "controlnet", str(data), "-o", str(run), "--steps", "3", "-b", "4")
    out = ldm(*args, "--holdout", "4", "--threads", "1").stdout
    assert "2,198,512 parameters" in out
    file = read_control_file(run / "model.safetensors")
    assert file.layout == "original" and file.state["zero_convs.0.0.weight"].dtype == torch.float16
    assert (run / "samples" / "samples_000003.png").exists()
    sketch = next(data.glob("*.png"))
    control = ("--control", str(run / "model.safetensors"), "--control-image", str(sketch))
    (path,) = written(
        ldm("generate", "a red circle", "--steps", "2", "--out", str(tmp_path / "o"), *control)
    )
    assert path.exists()
    again = ldm(*args, check=False)  # the run folder holds a finished run: refused
    assert again.returncode != 0 and again.stderr.count("\n") == 1


def test_a_new_controlnet_leaves_the_model_unchanged():
    """Zeroed outputs: every residual of the encoder copy is 0 at step 0."""
    from ldm_cli import load
    from ldm_cli.training.controlnet_stage import new_controlnet

    pipe = load(device="cpu", dtype="fp32")
    net = new_controlnet(pipe.unet, pipe.latent_factor)
    x = torch.randn(1, 4, 16, 16)
    context = torch.randn(1, 77, pipe.config.unet.context_dim)
    with torch.no_grad():
        residuals = net(x, torch.rand(1, 3, 64, 64), torch.tensor([500]), context)
    assert all(r.abs().max() == 0 for r in residuals)
    assert torch.equal(
        net.input_blocks[1][0].in_layers[2].weight, pipe.unet.input_blocks[1][0].in_layers[2].weight
    )
