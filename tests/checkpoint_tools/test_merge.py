"""`ldm merge`: every tensor equals the same fp32 arithmetic done on the inputs (weighted sum, add
difference, per-block alphas), A's tensors are kept where B lacks them, the recipe is recorded,
and files that do not fit each other are refused before anything is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.checkpoint_tools.merge import MergeJob, run_merge
from ldm_cli.checkpoints.hash import model_hash
from ldm_cli.core.config import TINY_SD1, TINY_SD2
from ldm_cli.core.errors import UserError
from ldm_cli.testing import random_checkpoint

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("merge")
    return {
        name: random_checkpoint(TINY_SD1, folder / f"{name}.safetensors", seed=seed)
        for name, seed in (("a", 1), ("b", 2), ("c", 3))
    }


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def recipe(path: Path) -> dict:
    with safe_open(str(path), "pt") as file:
        return json.loads(file.metadata()["ldm_merge"])


def test_weighted_sum_is_the_fp32_arithmetic_on_every_tensor(models, tmp_path):
    out = run_merge(MergeJob(models["a"], models["b"], tmp_path / "m.safetensors", alpha=0.3))
    a, b, merged = tensors(models["a"]), tensors(models["b"]), tensors(out)
    assert merged.keys() == a.keys()
    merged_count = 0
    for key, tensor in a.items():
        if tensor.is_floating_point() and key != POSITION_IDS:
            want = (tensor.float() * (1 - 0.3) + b[key].float() * 0.3).to(tensor.dtype)
            merged_count += 1
        else:
            want = tensor  # integer tensors and position ids: A's, as in A1111
        assert torch.equal(merged[key], want), key
    assert merged_count > 400
    assert recipe(out) == {
        "mode": "weighted_sum", "alpha": 0.3, "formula": "A*(1-alpha)+B*alpha",
        "a": {"name": "a.safetensors", "hash": model_hash(models["a"])},
        "b": {"name": "b.safetensors", "hash": model_hash(models["b"])},
        "c": None, "dtype": "kept", "block_weights": None,
    }  # fmt: skip


def test_add_difference_is_a_plus_b_minus_c_times_alpha(models, tmp_path):
    out = run_merge(
        MergeJob(models["a"], models["b"], tmp_path / "m.safetensors", 0.8, models["c"], "fp16")
    )
    a, b, c, merged = (tensors(p) for p in (models["a"], models["b"], models["c"], out))
    for key, tensor in a.items():
        if tensor.is_floating_point():
            diff = tensor.float() + (b[key].float() - c[key].float()) * 0.8
            want = tensor.half() if key == POSITION_IDS else diff.half()
        else:
            want = tensor
        assert torch.equal(merged[key], want), key
    described = recipe(out)
    assert described["mode"] == "add_difference" and described["dtype"] == "fp16"
    assert described["c"] == {"name": "c.safetensors", "hash": model_hash(models["c"])}


def test_tensors_only_a_holds_are_kept_and_only_b_holds_are_left_out(models, tmp_path):
    b = tensors(models["b"])
    dropped = "model.diffusion_model.out.2.bias"
    b.pop(dropped)
    b["extra.only.in.b"] = torch.ones(3)
    save_file(b, str(tmp_path / "b.safetensors"))
    out = run_merge(MergeJob(models["a"], tmp_path / "b.safetensors", tmp_path / "m.safetensors"))
    a, merged = tensors(models["a"]), tensors(out)
    assert merged.keys() == a.keys()
    assert torch.equal(merged[dropped], a[dropped])


def test_block_weights_give_each_unet_block_its_alpha(models, tmp_path):
    a, b = tensors(models["a"]), tensors(models["b"])
    inputs = sorted({int(m.group(1)) for k in a if (m := re.match(r".*input_blocks\.(\d+)\.", k))})
    outputs = sorted(
        {int(m.group(1)) for k in a if (m := re.match(r".*output_blocks\.(\d+)\.", k))}
    )
    names = [f"IN{i:02d}" for i in inputs] + ["M00"] + [f"OUT{i:02d}" for i in outputs]
    weights = tuple(round(0.1 + 0.8 * i / len(names), 3) for i in range(len(names)))
    table = dict(zip(names, weights, strict=True))
    job = MergeJob(models["a"], models["b"], tmp_path / "m.safetensors", 0.25, None, None, weights)
    merged = tensors(run_merge(job))
    for key, tensor in a.items():
        match = re.match(r"model\.diffusion_model\.(input_blocks|middle_block|output_blocks)", key)
        alpha = 0.25
        if match:
            number = re.match(r"[^.]+\.[^.]+\.[^.]+\.(\d+)", key)
            side = {"input_blocks": "IN", "output_blocks": "OUT"}.get(match.group(1))
            alpha = table["M00"] if side is None else table[f"{side}{int(number.group(1)):02d}"]
        if tensor.is_floating_point() and key != POSITION_IDS:
            want = tensor.float() * (1 - alpha) + b[key].float() * alpha
            assert torch.equal(merged[key], want), key
    with pytest.raises(UserError, match=f"has {len(names)} U-Net blocks"):
        run_merge(
            MergeJob(models["a"], models["b"], tmp_path / "n.safetensors", 0.5, None, None, (1,))
        )


def test_files_that_do_not_fit_are_refused_naming_the_first_mismatched_key(models, tmp_path):
    b = tensors(models["b"])
    key = "model.diffusion_model.input_blocks.0.0.bias"
    b[key] = torch.zeros(7)
    save_file(b, str(tmp_path / "wide.safetensors"))
    with pytest.raises(
        UserError, match=re.escape(f"{key} is [32] in a.safetensors and [7] in wide")
    ):
        run_merge(MergeJob(models["a"], tmp_path / "wide.safetensors", tmp_path / "m.safetensors"))
    sd2 = random_checkpoint(TINY_SD2, tmp_path / "sd2.safetensors", seed=4)
    message = (
        "cannot merge a.safetensors and sd2.safetensors: model.diffusion_model.input_blocks.0.0."
        "bias is [32] in a.safetensors and [64] in sd2.safetensors (models of different "
        "families or sizes: sd1 and sd2)"
    )
    with pytest.raises(UserError, match=re.escape(message)):
        run_merge(MergeJob(models["a"], sd2, tmp_path / "m.safetensors"))
    with pytest.raises(UserError, match="cannot merge"):
        run_merge(MergeJob(models["a"], models["b"], tmp_path / "m.safetensors", 1, sd2))
    lora = {"lora_unet_x.lora_down.weight": torch.ones(2, 4)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    with pytest.raises(UserError, match="no tensor in common"):
        run_merge(MergeJob(models["a"], tmp_path / "lora.safetensors", tmp_path / "m.safetensors"))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["lora.safetensors", "sd2.safetensors", "wide.safetensors"]


def test_an_existing_output_is_never_overwritten(models, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="exists already"):
        run_merge(MergeJob(models["a"], models["b"], out))
    assert out.read_bytes() == b"keep me"


def test_a_merged_file_loads_and_renders(models, tmp_path):
    import ldm_cli

    out = run_merge(MergeJob(models["a"], models["b"], tmp_path / "m.safetensors", 0.5))
    pipe = ldm_cli.load(out, device="cpu", dtype="fp32")
    (image,) = pipe.generate("a cat", steps=2, seed=1, width=64, height=64)
    assert image.size == (64, 64)
