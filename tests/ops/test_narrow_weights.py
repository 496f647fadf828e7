"""--low-memory (the default on AVX-512 CPUs, and where memory is short): an fp16 file's large
U-Net weights stay 16-bit views of the file,
widened to fp32 a slice at a time in each call; the images, LoRA patches and errors are as with
--no-low-memory."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.models import loading
from ldm_cli.ops import conv_linear, narrow_weights, weight_slices
from ldm_cli.ops.file_pages import file_mapped
from ldm_cli.ops.winograd_conv import WinogradConv2d
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    """Every weight of the tiny model kept narrow, widened a few output channels at a time."""
    monkeypatch.setattr(narrow_weights, "MIN_BYTES", 0)
    monkeypatch.setattr(weight_slices, "CHUNK_BYTES", 4 << 10)


@pytest.mark.parametrize("narrow_dtype", [torch.float16, torch.bfloat16])
def test_conv_and_linear_slices_equal_the_widened_weight(narrow_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 9, 7, generator=g)
    w = torch.randn(40, 24, 3, 3, generator=g).to(narrow_dtype)
    b = torch.randn(40, generator=g)
    got = weight_slices.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w.float(), b, padding=1))
    rows = torch.randn(3, 300, 64, generator=g)
    lw = torch.randn(50, 64, generator=g).to(narrow_dtype)
    got = weight_slices.linear(rows, lw, None, conv_linear.linear)
    torch.testing.assert_close(got, rows @ lw.float().T)


@pytest.fixture(scope="module")
def fp16_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny16.safetensors"
    return random_checkpoint(TINY_SD1, path, seed=4, dtype=torch.float16)


def narrow_params(pipe) -> list[tuple[str, torch.Tensor]]:
    kinds = (WinogradConv2d, conv_linear.Linear)
    return [
        (name, module.weight)
        for name, module in pipe.model.unet.named_modules()
        if isinstance(module, kinds)
    ]


def test_low_memory_keeps_the_unets_weights_in_the_file_and_draws_the_same(fp16_file):
    kwargs = {"steps": 3, "seed": 2, "sampler": "euler", "width": 64, "height": 64}
    wide = ldm_cli.load(fp16_file, device="cpu", dtype="fp32", low_memory=False)
    narrow = ldm_cli.load(fp16_file, device="cpu", dtype="fp32", low_memory=True)
    kept = narrow_params(narrow)
    assert kept and all(w.dtype == torch.float16 for _, w in kept)
    assert all(w.dtype == torch.float32 for _, w in narrow_params(wide))
    if sys.platform.startswith("linux"):
        w = kept[0][1]
        assert file_mapped(w.data_ptr(), w.data_ptr() + w.numel() * 2)
    # everything else was converted as usual
    assert narrow.model.vae.decoder.conv_in.weight.dtype == torch.float32
    (a,) = wide.generate("a red circle", **kwargs)
    (b,) = narrow.generate("a red circle", **kwargs)
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
    assert diff <= 1


def test_the_default_follows_the_cpu_and_the_free_memory(monkeypatch, fp16_file):
    from ldm_cli.ops import cpu_kind
    from ldm_cli.pipeline.load import LoadOptions

    header = loading.read_header(fp16_file)
    size = fp16_file.stat().st_size
    for kind, free, narrow in [
        ("AVX512", 100 * size, True),  # Zen 5: steps as fast, load faster
        ("AVX2", 100 * size, False),  # AVX2 EPYC: steps 24% slower narrow
        ("AVX2", 2 * size, True),  # unless widening would leave too little memory free
        ("DEFAULT", None, False),
    ]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda kind=kind: kind)
        monkeypatch.setattr(cpu_kind, "available_memory_bytes", lambda free=free: free)
        assert LoadOptions().narrow(header) is narrow, kind
        assert LoadOptions(low_memory=True).narrow(header) is True
        assert LoadOptions(low_memory=False).narrow(header) is False
        assert LoadOptions(offload="model").narrow(header) is False


def test_nothing_is_kept_narrow_for_other_files_devices_or_dtypes(fp16_file, tmp_path):
    model = loading.build_empty(TINY_SD1)
    header = loading.read_header(fp16_file)
    cpu = torch.device("cpu")
    assert loading.narrow_keys(model, header, cpu, torch.float32)
    assert not loading.narrow_keys(model, header, cpu, torch.float16)
    assert not loading.narrow_keys(model, header, torch.device("cuda"), torch.float32)
    fp32 = random_checkpoint(TINY_SD1, tmp_path / "tiny32.safetensors", seed=4)
    assert not loading.narrow_keys(model, loading.read_header(fp32), cpu, torch.float32)


def test_a_lora_patches_narrow_weights_as_it_patches_converted_ones(fp16_file, tmp_path):
    from tests.networks.test_lora import diffusers_sd1, write_kohya

    lora = write_kohya(tmp_path / "l.safetensors", diffusers_sd1(fp16_file), seed=5)
    patched = {}
    for low_memory in (False, True):
        pipe = ldm_cli.load(fp16_file, device="cpu", dtype="fp32", low_memory=low_memory)
        before = {k: v.float().clone() for k, v in pipe.model.unet.state_dict().items()}
        pipe.networks.apply([(lora, 0.7, 0.7)])
        state = pipe.model.unet.state_dict()
        patched[low_memory] = {k: v for k, v in state.items() if not torch.equal(v, before[k])}
        pipe.networks.restore()
        restored = pipe.model.unet.state_dict()
        assert all(torch.equal(restored[k].float(), before[k]) for k in before)
    assert patched[True].keys() == patched[False].keys() and patched[True]
    for key, value in patched[True].items():
        assert value.dtype == torch.float32  # widened before the patch, not rounded to fp16
        assert torch.equal(value, patched[False][key])


def test_low_memory_with_compile_is_a_one_line_error(tmp_path):
    proc = ldm("generate", "x", "--low-memory", "--compile", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --low-memory does not work with --compile; use one of them"
    ]
