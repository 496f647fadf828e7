"""Converting a checkpoint's tensors to another dtype straight from the file's memory map."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from ldm_cli.checkpoints.file import read_header
from ldm_cli.models.loading import TORCH_DTYPES
from ldm_cli.ops.converted_load import ALIGN, read_converted


def test_values_shapes_and_alignment(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g).half(),
        "b": torch.randn(7, generator=g).bfloat16(),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    wanted = {k: (TORCH_DTYPES[i.dtype], i.shape, i.offset) for k, i in header.tensors.items()}
    out = read_converted(path, wanted, torch.float32)
    for key, ref in tensors.items():
        assert out[key].dtype == torch.float32 and out[key].shape == ref.shape
        assert torch.equal(out[key], ref.float())
        if out[key].numel():
            assert out[key].data_ptr() % ALIGN == 0
    out["a"].add_(1)  # writable, as LoRA patches need
    assert torch.equal(out["a"], tensors["a"].float() + 1)
