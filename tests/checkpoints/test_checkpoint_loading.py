"""Single-file loading: detection from shapes, strictness, dtypes, header validation."""

import json
import struct
import sys

import pytest
import torch
from safetensors.torch import save_file

from ldm_cli.checkpoints.detect import detect_config
from ldm_cli.checkpoints.file import read_header
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.models.loading import load_model
from ldm_cli.testing import random_checkpoint, randomize_


@pytest.fixture(scope="module")
def tiny_state():
    model = randomize_(LatentDiffusion(TINY_SD1), seed=3)
    return model.state_dict()


def test_load_roundtrip_equals_saved_weights(tmp_path, tiny_state):
    path = random_checkpoint(TINY_SD1, tmp_path / "tiny.safetensors", seed=3)
    model, header = load_model(path)
    assert model.config == TINY_SD1
    loaded = model.state_dict()
    assert loaded.keys() == tiny_state.keys()
    for k, v in tiny_state.items():
        assert torch.equal(loaded[k], v), k
    assert not any(p.requires_grad for p in model.parameters())


def test_detection_from_shapes_alone(tmp_path):
    path = random_checkpoint(TINY_SD1, tmp_path / "bare.safetensors", with_metadata=False)
    cfg = detect_config(read_header(path))
    assert cfg.family == "sd1"
    u, ref = cfg.unet, TINY_SD1.unet
    for field in (
        "in_channels",
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_resolutions",
        "transformer_depth",
        "context_dim",
        "use_linear_in_transformer",
    ):
        assert getattr(u, field) == getattr(ref, field), field
    assert cfg.vae.ch == TINY_SD1.vae.ch and cfg.vae.ch_mult == TINY_SD1.vae.ch_mult
    assert cfg.text.num_hidden_layers == 2 and cfg.text.hidden_size == 32
    # heads are not visible in shapes: SD 1.x's 8 is assumed, the load still succeeds
    load_model(path)


def test_known_extras_are_skipped(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10)
    state["betas"] = torch.linspace(0.0001, 0.02, 1000)
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[
        None
    ]
    path = tmp_path / "extras.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model, _ = load_model(path, cfg=TINY_SD1)
    pos = model.text_encoder.transformer.text_model.embeddings.position_ids
    assert torch.equal(pos.flatten(), torch.arange(77))


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_strict_errors_name_the_tensors(tmp_path, tiny_state, kind):
    state = dict(tiny_state)
    key = "model.diffusion_model.out.2.weight"
    if kind == "missing":
        del state[key]
    elif kind == "unexpected":
        state["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    else:
        state[key] = torch.zeros(5, 5)
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError) as err:
        load_model(path, cfg=TINY_SD1)
    msg = str(err.value)
    assert "\n" not in msg
    assert ("extra_head" if kind == "unexpected" else "out.2.weight") in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_files_load_in_any_dtype(tmp_path, tiny_state, dtype):
    path = random_checkpoint(TINY_SD1, tmp_path / "half.safetensors", seed=3, dtype=dtype)
    for target in (None, torch.float32, torch.float16):
        model, _ = load_model(path, dtype=target)
        p = model.unet.out[2].weight
        assert p.dtype == (target or dtype)
        stored = tiny_state["model.diffusion_model.out.2.weight"].to(dtype)
        assert torch.equal(p, stored.to(p.dtype))


def test_same_dtype_load_is_memory_mapped(tmp_path):
    path = random_checkpoint(TINY_SD1, tmp_path / "mm.safetensors", seed=1)
    model, _ = load_model(path)
    emb = model.text_encoder.transformer.text_model.embeddings.token_embedding.weight
    # a memory-mapped tensor does not own resizable memory of its own
    assert not emb.untyped_storage().resizable()


def _write_raw(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _entry(dtype: str, shape: list[int], end: int) -> dict:
    return {"a": {"dtype": dtype, "shape": shape, "data_offsets": [0, end]}}


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.write_bytes(b"abc"), "too short"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header size"),
        (lambda p: _write_raw(p, _entry("F32", [4], 16), b"\0" * 8), "truncated"),
        (lambda p: _write_raw(p, _entry("Q9", [1], 4), b"\0" * 4), "dtype"),
        (lambda p: _write_raw(p, _entry("F32", [3], 4), b"\0" * 4), "byte size"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]"), "not JSON"),
        (lambda p: _write_raw(p, _entry("F32", [1], 4), b"\0" * 4), "not a Stable Diffusion"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, make, needle):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(UserError) as err:
        load_model(path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_pickle_and_missing_files_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"whatever")
    with pytest.raises(UserError, match="pickled"):
        read_header(ckpt)
    with pytest.raises(UserError, match="not found"):
        read_header(tmp_path / "nope.safetensors")


def test_weights_in_their_own_dtype_are_views_of_the_file_and_writable(tmp_path, tiny_state):
    from ldm_cli.ops.file_pages import file_mapped

    path = random_checkpoint(TINY_SD1, tmp_path / "tiny.safetensors", seed=3)
    before = path.read_bytes()
    model, _ = load_model(path)
    weight = model.unet.out[2].weight
    start = weight.data_ptr()
    assert file_mapped(start, start + weight.numel() * 4) or not sys.platform.startswith("linux")
    with torch.no_grad():
        weight.add_(1)  # as a LoRA patch: a private copy of the page, the file unchanged
    assert torch.equal(weight, tiny_state["model.diffusion_model.out.2.weight"] + 1)
    assert path.read_bytes() == before


def test_a_tensor_misaligned_for_its_dtype_is_read_into_its_own_memory(tmp_path):
    from ldm_cli.models.loading import read_safetensors

    entries = {
        "a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]},  # at byte 2 of the data
    }
    raw = json.dumps(entries).encode()
    raw += b" " * (-len(raw) % 8)
    data = torch.tensor([1.5], dtype=torch.float16).numpy().tobytes()
    data += torch.tensor([2.5, -1.0]).numpy().tobytes()
    path = tmp_path / "misaligned.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    state = read_safetensors(read_header(path), ["a", "b"], torch.device("cpu"), None)
    assert state["a"].tolist() == [1.5] and state["b"].tolist() == [2.5, -1.0]
