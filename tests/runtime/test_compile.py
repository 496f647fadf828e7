"""`--compile`: the compiled U-Net gives the eager one's output, and a missing compiler is a
one-line error.

torch.compile's first call generates and builds C++ kernels: about 1 minute of CPU for the
one-level U-Net used here when inductor's cache (/tmp/torchinductor_$USER) is cold, seconds
when it is warm. The U-Net is TINY_SD1's with one resolution level, which keeps every kind of
block (ResBlock, SpatialTransformer, time embedding) and halves the kernels to build.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.errors import UserError
from ldm_cli.runtime.compile import check_compile, is_compiled, unavailable_reason
from ldm_cli.testing import ONE_LEVEL_SD1, random_checkpoint
from tests.cli_helpers import ldm

CPU = torch.device("cpu")
REASON = unavailable_reason(CPU)


@pytest.fixture(scope="module")
def one_level(tmp_path_factory):
    return random_checkpoint(
        ONE_LEVEL_SD1, tmp_path_factory.mktemp("m") / "one.safetensors", seed=4
    )


@pytest.mark.slow
@pytest.mark.skipif(REASON is not None, reason=f"inductor unavailable: {REASON}")
def test_compiled_unet_and_image_equal_eager(one_level):
    eager = ldm_cli.load(one_level, device="cpu")
    pipe = ldm_cli.load(one_level, device="cpu", compile=True)
    assert is_compiled(pipe.unet) and not is_compiled(eager.unet)
    assert [k for k, _ in pipe.unet.named_parameters()] == [
        k for k, _ in eager.unet.named_parameters()
    ]  # same module, same names (LoRA patching and offload hooks rely on them)
    # the shapes `generate` uses below (CFG batch of 2, 77 tokens), so one graph serves both
    gen = torch.Generator().manual_seed(0)
    h, w = pipe.latent_shape(64, 64)[2:]
    x = torch.randn(2, 4, h, w, generator=gen)
    t = torch.tensor([999.0, 500.0])
    context = torch.randn(2, 77, ONE_LEVEL_SD1.unet.context_dim, generator=gen)
    with torch.inference_mode():
        want = pipe.unet.eager_forward(x, t, context)
        got = pipe.unet(x, t, context)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)  # measured 7.5e-8 (outputs up to 0.15)
    images = [
        np.asarray(p.generate("a cat", steps=2, seed=1, sampler="euler")[0]).astype(int)
        for p in (eager, pipe)
    ]
    assert np.abs(images[0] - images[1]).max() <= 1  # measured 0


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_the_unet_compiles_as_one_graph(tmp_path, monkeypatch, layout):
    """No graph break: a break in the U-Net's forward makes dynamo skip that frame and compile
    each block on its own, which hits the recompile limit and leaves the rest eager."""
    import ldm_cli.ops.upsample_conv as upsample_conv
    import ldm_cli.ops.winograd_conv as winograd_conv
    from ldm_cli.core.config import TINY_SD1

    monkeypatch.setattr(upsample_conv, "MIN_ELEMENTS", 0)  # the folded, cached path too
    # the Winograd mode not yet asked for: finding it asks the CPU, a break if traced
    monkeypatch.setattr(winograd_conv, "_settings", {"mode": None, "tile": 2})
    pipe = ldm_cli.load(random_checkpoint(TINY_SD1, tmp_path / "t.safetensors", seed=1), "cpu")
    unet = pipe.model.unet
    x = torch.randn(2, 4, 8, 8)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        explained = torch._dynamo.explain(unet.forward)(
            x, torch.tensor([500.0, 500.0]), torch.randn(2, 77, unet.config.context_dim)
        )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_missing_compiler_is_a_one_line_error(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    with pytest.raises(UserError) as caught:
        check_compile(CPU)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--compile cannot work here: inductor needs a C++ compiler")


def test_compile_is_off_by_default_and_documented(one_level):
    assert not is_compiled(ldm_cli.load(one_level, device="cpu").unet)
    proc = ldm("generate", "--help")
    assert "--compile" in proc.stdout and "torch.compile" in proc.stdout


def test_cuda_graphs_need_a_cuda_device(one_level):
    with pytest.raises(UserError, match="--cuda-graphs needs a CUDA device, not cpu"):
        ldm_cli.load(one_level, device="cpu", cuda_graphs=True)
    args = ("generate", "a cat", "--cuda-graphs", "--model", str(one_level), "--device", "cpu")
    proc = ldm(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --cuda-graphs needs a CUDA device, not cpu; run without --cuda-graphs"
    ]
    assert "--cuda-graphs" in ldm("img2img", "--help").stdout


def test_cuda_graphs_clashes_are_refused_before_loading(tmp_path):
    from ldm_cli.pipeline.load import LoadOptions, load_model_with

    missing = tmp_path / "never-read.safetensors"  # the error must come before any read
    cuda = torch.device("cuda")
    with pytest.raises(UserError, match="--cuda-graphs does not work with --offload"):
        options = LoadOptions(offload="model", cuda_graphs=True)
        load_model_with(missing, cuda, torch.float16, options)
    with pytest.raises(UserError, match="--low-memory does not work with --cuda-graphs"):
        options = LoadOptions(low_memory=True, cuda_graphs=True)
        load_model_with(missing, cuda, torch.float32, options)


def test_cuda_graph_replays_are_copied_out(monkeypatch):
    """Each call marks a new step for torch's graph trees and returns a copy of the replay's
    output, which the next replay overwrites in place (the fake below does the same)."""
    import ldm_cli.runtime.compile as cu

    static_out = torch.zeros(3)
    modes, steps = [], []

    def fake_compile(fn, dynamic, mode=None):
        modes.append(mode)

        def replay(x):
            static_out.copy_(fn(x))
            return static_out

        return replay

    monkeypatch.setattr(cu, "check_compile", lambda device, cuda_graphs=False: None)
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    unet = torch.nn.Identity()
    cu.compile_unet(unet, torch.device("cuda"), cuda_graphs=True)
    first = unet(torch.ones(3))
    second = unet(torch.full((3,), 2.0))
    assert modes == ["reduce-overhead"] and len(steps) == 2 and unet.cuda_graphs
    assert first.tolist() == [1.0] * 3 and second.tolist() == [2.0] * 3
    plain = torch.nn.Identity()
    cu.compile_unet(plain, torch.device("cuda"))
    assert modes[-1] is None and len(steps) == 2  # no graphs: neither marks nor copies


@pytest.mark.parametrize("name", ["flux-dev", "sd35"])
def test_flow_transformers_compile_as_one_graph(tmp_path, name):
    """`--compile` on FLUX and SD3 compiles their transformer (compile_unet, as the U-Net's)
    with no graph break. A whole image compiled on this CPU (inductor, C++ kernels built in
    about a minute) gave the eager one's pixels within 1/255 (docs/flow-models.md)."""
    from ldm_cli.testing import TINY_FLUX_DEV, TINY_SD35, random_flow_checkpoint

    cfg = TINY_FLUX_DEV if name == "flux-dev" else TINY_SD35
    pipe = ldm_cli.load(random_flow_checkpoint(cfg, tmp_path / "f.safetensors", seed=1), "cpu")
    net = pipe.model.unet
    tc = net.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *pipe.latent_shape(64, 64)[1:], generator=gen)
    inputs = [x, torch.tensor([0.9, 0.4])]
    inputs += [torch.randn(2, 16, tc.context_in_dim, generator=gen)]
    inputs += [torch.randn(2, tc.vec_in_dim if name == "flux-dev" else tc.adm_in_channels)]
    if name == "flux-dev":
        inputs.append(torch.tensor([3.5, 3.5]))
    with torch.inference_mode():
        explained = torch._dynamo.explain(net.forward)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
