"""`ldm convert` on tiny seeded checkpoints: pickles to .safetensors byte for byte, dtype casts
equal to torch's, --prune/--ema keep and drop exactly what docs/checkpoint-files.md says, the
metadata records what was done, and nothing is ever overwritten."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_cli.checkpoint_tools.convert import ConvertJob, run_convert
from ldm_cli.checkpoint_tools.prune import ema_key
from ldm_cli.checkpoints.hash import model_hash
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.testing import random_checkpoint

TRAINING_ONLY = {
    "first_stage_model.loss.discriminator.main.0.weight",
    "first_stage_model.loss.logvar",
    "logvar",
    "lvlb_weights",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("convert")
    return random_checkpoint(TINY_SD1, folder / "tiny.safetensors", seed=3, with_metadata=False)


@pytest.fixture(scope="module")
def training_ckpt(tiny) -> Path:
    """A Lightning-style training .ckpt: the weights, their EMA copy (LitEma's dotless names),
    loss tensors and an optimizer state beside the state dict."""
    state = load_file(str(tiny))
    gen = torch.Generator().manual_seed(9)
    for key in list(state):
        if key.startswith("model.diffusion_model."):
            state[ema_key(key)] = state[key] + 0.01 * torch.randn(state[key].shape, generator=gen)
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.randn(4, 3, 3, 3)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["logvar"] = torch.zeros(1000)
    state["lvlb_weights"] = torch.ones(1000)
    path = tiny.with_name("training.ckpt")
    optimizer = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4}]}
    torch.save({"state_dict": state, "optimizer_states": [optimizer], "global_step": 7}, path)
    return path


def convert(tmp_path: Path, source: Path, name: str = "out.safetensors", **options) -> Path:
    return run_convert(ConvertJob(source, tmp_path / name, **options))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert raw_bytes(a[key]) == raw_bytes(b[key]), key


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as file:
        return file.metadata()


def test_pickle_to_safetensors_keeps_every_tensor_byte_for_byte(tiny, tmp_path):
    pickled = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny)), "epoch": 1}, pickled)
    out = convert(tmp_path, pickled)
    assert_identical(load_file(str(out)), load_file(str(tiny)))
    record = json.loads(metadata(out)["ldm_convert"])
    assert record == {
        "source": "tiny.ckpt", "source_hash": model_hash(pickled), "dtype": "kept",
        "pruned": False, "ema": False, "vae": None, "loras": [],
    }  # fmt: skip


def test_the_header_is_sorted_and_the_data_aligned(tiny, tmp_path):
    out = convert(tmp_path, tiny, dtype="fp16")
    raw = out.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert list(header) == sorted(header)
    assert (8 + length) % 8 == 0
    ends = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and all(x[1] == y[0] for x, y in zip(ends, ends[1:], strict=False))
    assert ends[-1][1] == len(raw) - 8 - length
    widths = {"F32": 4, "F16": 2, "I64": 8, "I32": 4}
    for entry in header.values():
        if "dtype" in entry:
            assert entry["data_offsets"][0] % widths[entry["dtype"]] == 0


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_casts_equal_torchs_and_keep_integer_tensors(tiny, tmp_path, name, dtype):
    original = load_file(str(tiny))
    out = convert(tmp_path, tiny, dtype=name)
    cast = load_file(str(out))
    for key, tensor in original.items():
        want = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert cast[key].dtype == want.dtype and torch.equal(cast[key], want), key
    assert cast["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == (
        torch.int64
    )
    back = load_file(str(convert(tmp_path, out, "back.safetensors", dtype="fp32")))
    for key, tensor in cast.items():
        want = tensor.float() if tensor.is_floating_point() else tensor
        assert torch.equal(back[key], want), key
    assert json.loads(metadata(out)["ldm_convert"])["dtype"] == name


def test_prune_drops_exactly_the_ema_copy_and_training_only_tensors(training_ckpt, tiny, tmp_path):
    full = load_file(str(convert(tmp_path, training_ckpt, "full.safetensors")))
    pruned = load_file(str(convert(tmp_path, training_ckpt, prune=True)))
    dropped = set(full) - set(pruned)
    ema = {k for k in full if k.startswith("model_ema.")}
    assert len(ema) > 100 and {"model_ema.decay", "model_ema.num_updates"} <= ema
    assert dropped == ema | TRAINING_ONLY
    # the trained weights, the schedule buffers, the position ids: all that the tiny file holds
    # but its EMA bookkeeping
    kept = {k: v for k, v in load_file(str(tiny)).items() if not k.startswith("model_ema.")}
    assert_identical(pruned, kept)


def test_ema_takes_the_averaged_weights_in_place_of_the_trained_ones(training_ckpt, tmp_path):
    full = load_file(str(convert(tmp_path, training_ckpt, "full.safetensors")))
    ema = load_file(str(convert(tmp_path, training_ckpt, ema=True, prune=True)))
    assert not any(k.startswith("model_ema.") for k in ema)
    unet = [k for k in ema if k.startswith("model.diffusion_model.")]
    assert unet and all(torch.equal(ema[k], full[ema_key(k)]) for k in unet)
    assert not torch.equal(ema[unet[0]], full[unet[0]])
    others = [k for k in ema if not k.startswith("model.")]
    assert all(torch.equal(ema[k], full[k]) for k in others)
    record = json.loads(metadata(tmp_path / "out.safetensors")["ldm_convert"])
    assert record["pruned"] and record["ema"]


def test_ema_without_an_ema_copy_is_an_error(tiny, tmp_path):
    bare = {k: v for k, v in load_file(str(tiny)).items() if not k.startswith("model_ema.")}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    with pytest.raises(UserError, match="holds no EMA weights"):
        convert(tmp_path, tmp_path / "bare.safetensors", ema=True)
    assert not (tmp_path / "out.safetensors").exists()


def test_the_output_loads_in_ldm_and_keeps_the_sources_metadata(tmp_path):
    import ldm_cli

    source = random_checkpoint(TINY_SD1, tmp_path / "with-config.safetensors", seed=4)
    out = convert(tmp_path, source, dtype="fp16")
    assert metadata(out)["ldm_config"] == metadata(source)["ldm_config"]
    pipe = ldm_cli.load(out, device="cpu", dtype="fp32")
    assert pipe.config == ldm_cli.load(source, device="cpu", dtype="fp32").config


def test_an_existing_output_is_never_overwritten(tiny, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="exists already"):
        convert(tmp_path, tiny)
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_a_pickle_that_runs_code_is_refused_and_nothing_is_written(tmp_path):
    import os

    marker = tmp_path / "ran"

    class RunsShell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "payload": RunsShell()}, hostile)
    with pytest.raises(UserError, match="nothing in it was run"):
        convert(tmp_path, hostile)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
