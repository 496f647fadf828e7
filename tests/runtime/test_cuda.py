"""CUDA checks, skipped where no GPU is present (CI, and every machine this project was built
on so far): `scripts/gpu-check.sh` runs them on a lent GPU machine together with the CUDA bench.

The same seed gives the same image on the GPU as on the CPU (noise is drawn on the CPU), and
`--cuda-graphs` replays give the eager U-Net's outputs, each call's kept intact by the next.
The tolerances have not been measured yet (no GPU so far): the first run should set them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.runtime.compile import unavailable_reason
from ldm_cli.testing import ONE_LEVEL_SD1, random_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=3)


@pytest.fixture(scope="module")
def one_level(tmp_path_factory):
    return random_checkpoint(
        ONE_LEVEL_SD1, tmp_path_factory.mktemp("m") / "one.safetensors", seed=4
    )


def _image(pipe, **options) -> np.ndarray:
    image = pipe.generate("a cat", steps=3, seed=1, sampler="euler", **options)[0]
    return np.asarray(image).astype(int)


def test_same_seed_same_image_on_gpu_and_cpu(tiny):
    gpu = _image(ldm_cli.load(tiny, device="cuda", dtype="fp32"))
    cpu = _image(ldm_cli.load(tiny, device="cpu", dtype="fp32"))
    assert np.abs(gpu - cpu).max() <= 2


def test_fp16_on_gpu_stays_near_fp32(tiny):
    half = _image(ldm_cli.load(tiny, device="cuda", dtype="fp16"))
    full = _image(ldm_cli.load(tiny, device="cuda", dtype="fp32"))
    assert np.abs(half - full).max() <= 8


@pytest.mark.skipif(unavailable_reason(CUDA) is not None, reason="inductor unavailable for CUDA")
def test_cuda_graph_replays_equal_eager_calls(one_level):
    pipe = ldm_cli.load(one_level, device="cuda", dtype="fp32", cuda_graphs=True)
    gen = torch.Generator().manual_seed(0)
    h, w = pipe.latent_shape(64, 64)[2:]
    context = torch.randn(2, 77, ONE_LEVEL_SD1.unet.context_dim, generator=gen).to(CUDA)
    inputs = [(torch.randn(2, 4, h, w, generator=gen).to(CUDA), float(t)) for t in (999, 500, 1)]
    with torch.inference_mode():
        outs = [pipe.unet(x, torch.full((2,), t, device=CUDA), context) for x, t in inputs]
        wants = [
            pipe.unet.eager_forward(x, torch.full((2,), t, device=CUDA), context) for x, t in inputs
        ]
    for got, want in zip(outs, wants, strict=True):  # the first outputs were not overwritten
        assert torch.allclose(got, want, rtol=0, atol=2e-3)
    eager = ldm_cli.load(one_level, device="cuda", dtype="fp32")
    assert np.abs(_image(pipe) - _image(eager)).max() <= 2
