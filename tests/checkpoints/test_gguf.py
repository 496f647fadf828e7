"""GGUF files: headers read as safetensors' are, blocks dequantised exactly as the `gguf`
package does, a layer at a time, and a Q8_0 FLUX close to its fp16 source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ldm_cli
from ldm_cli.checkpoints.file import read_header
from ldm_cli.checkpoints.gguf_file import GGUFHeader
from ldm_cli.ops.gguf_weights import dequantize
from ldm_cli.testing import TINY_FLUX_DEV, random_flow_checkpoint, split_flow_checkpoint, write_gguf

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequantize_equals_gguf(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    weight = np.random.default_rng(0).standard_normal((24, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(weight, qtype)
    expected = gguf.quants.dequantize(blocks, qtype)
    ours = dequantize(torch.from_numpy(blocks), type_name, weight.shape, torch.float32)
    assert torch.equal(ours, torch.from_numpy(expected))


def test_header_has_torch_shapes(tmp_path):
    tensors = {"a.weight": torch.randn(8, 64), "a.bias": torch.randn(8)}
    header = read_header(write_gguf(tensors, tmp_path / "t.gguf"))
    assert isinstance(header, GGUFHeader)
    assert header.tensors["a.weight"].shape == (8, 64)
    assert header.tensors["a.weight"].dtype == "Q8_0"
    assert header.tensors["a.bias"].dtype == "F32"


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    path = random_flow_checkpoint(TINY_FLUX_DEV, folder / "all.safetensors", 3, torch.float16)
    files = split_flow_checkpoint(path, folder)
    files["gguf"] = write_gguf(load_file(str(files["model"])), folder / "model-Q8_0.gguf")
    return files


def test_q8_0_flux_draws_its_fp16_source(flux_files):
    """Q8_0 keeps 8 bits per weight plus a scale per 32: the image moves by a few levels at
    most (measured: max 3/255, mean 0.34/255 on this model)."""
    parts = {k: flux_files[k] for k in ("vae", "clip_l", "t5")}
    source = ldm_cli.load(flux_files["model"], "cpu", **parts)
    quantised = ldm_cli.load(flux_files["gguf"], "cpu", **parts)
    weights = [n for n, _ in quantised.model.unet.named_parameters() if "original" in n]
    assert len(weights) > 20  # every linear layer's weight stays in its blocks
    options = {"seed": 1, "steps": 4, "width": 64, "height": 64}
    a = np.asarray(source.generate("a cat", **options)[0]).astype(int)
    b = np.asarray(quantised.generate("a cat", **options)[0]).astype(int)
    assert np.abs(a - b).max() <= 6
    assert np.abs(a - b).mean() <= 1.0


def test_fp8_transformer_is_widened_per_call(flux_files, tmp_path):
    """A float8_e4m3fn file (as FLUX fp8 checkpoints ship): the large linear weights stay fp8
    and are widened per call; the image stays near the fp16 source's."""
    from safetensors.torch import save_file

    state = load_file(str(flux_files["model"]))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    save_file(fp8, str(tmp_path / "model-fp8.safetensors"))
    parts = {k: flux_files[k] for k in ("vae", "clip_l", "t5")}
    pipe = ldm_cli.load(tmp_path / "model-fp8.safetensors", "cpu", **parts)
    dtypes = {p.dtype for p in pipe.model.unet.parameters()}
    assert torch.float8_e4m3fn in dtypes and torch.float32 in dtypes
    source = ldm_cli.load(flux_files["model"], "cpu", **parts)
    options = {"seed": 1, "steps": 4, "width": 64, "height": 64}
    a = np.asarray(source.generate("a cat", **options)[0]).astype(int)
    b = np.asarray(pipe.generate("a cat", **options)[0]).astype(int)
    assert np.abs(a - b).mean() <= 6
