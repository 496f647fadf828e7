"""The key tables and configurations of a diffusers pipeline folder at real size (SD 1.5,
2.1, SDXL base), against the model repositories' configurations (../shared/reference) and the
diffusers and transformers models built from them on the meta device."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from ldm_cli.checkpoints.diffusers_layout import EXTRA, layout_entries, to_parts
from ldm_cli.checkpoints.diffusers_layout_config_read import model_config
from ldm_cli.checkpoints.diffusers_layout_configs import folder_configs
from ldm_cli.checkpoints.diffusers_unet import block_kinds
from ldm_cli.core.config import SD15, SD21, SDXL_BASE
from ldm_cli.models.loading import build_empty

diffusers = pytest.importorskip("diffusers")
REAL = [(SD15, "sd15"), (SD21, "sd21"), (SDXL_BASE, "sdxl-base")]

# metadata, and fields the loaded models do not read (a CLIPTextModel's projection_dim)
IGNORED = {
    "_diffusers_version", "_name_or_path", "transformers_version", "torch_dtype",
    "architectures", "name_or_path", "special_tokens_map_file", "projection_dim",
}  # fmt: skip


def class_defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}  # fmt: skip


def normalize(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("cfg, folder", REAL, ids=[f for _, f in REAL])
def test_real_size_configs_equal_the_repositories(cfg, folder, reference_dir):
    from transformers import CLIPTextConfig

    ref = Path(reference_dir) / folder
    ours = folder_configs(cfg)
    checked = 0
    for name, config in ours.items():
        if name == "model_index.json" or not (ref / name).is_file():
            continue
        theirs = json.loads((ref / name).read_text())
        cls = config.get("_class_name")
        defaults = class_defaults(getattr(diffusers, cls)) if cls else CLIPTextConfig().to_dict()
        for key in (set(theirs) | set(config)) - IGNORED:
            mine = config.get(key, defaults.get(key))
            expected = theirs.get(key, defaults.get(key))
            if key == "upcast_attention":  # diffusers reads it as a truth value (SDXL's is null)
                mine, expected = bool(mine), bool(expected)
            assert normalize(mine) == normalize(expected), f"{folder}/{name}: {key}"
        checked += 1
    assert checked >= (6 if cfg.conditioner else 4)
    index = json.loads((ref / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"):
        assert ours["model_index.json"].get(part) == index.get(part), part
    # and the repositories' configurations read back to the presets
    configs = {
        p.relative_to(ref).as_posix(): json.loads(p.read_text()) for p in ref.rglob("*.json")
    }
    assert model_config(configs) == cfg


@pytest.mark.parametrize("cfg, folder", REAL, ids=[f for _, f in REAL])
def test_real_size_tables_give_every_tensor_of_diffusers_models(cfg, folder, reference_dir):
    """On the meta device: the real models' tensors, converted, are exactly (names and shapes)
    those of diffusers' and transformers' models built from the repositories' configurations."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = build_empty(cfg)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    entries = layout_entries(shapes, cfg, block_kinds(model.model.diffusion_model))
    parts = to_parts(state, entries, shapes)
    ref = Path(reference_dir) / folder
    builders = {
        "unet": lambda c: diffusers.UNet2DConditionModel.from_config(c),
        "vae": lambda c: diffusers.AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
    }
    for part, tensors in parts.items():
        if part == EXTRA:
            continue
        with torch.device("meta"):
            reference = builders[part](json.loads((ref / part / "config.json").read_text()))
        # transformers >= 5.6 keeps no text_model module (its files still name it)
        expected = {k.removeprefix("text_model."): tuple(v.shape)
                    for k, v in reference.state_dict().items()
                    if not k.endswith("position_ids")}  # fmt: skip
        got = {k.removeprefix("text_model."): tuple(v.shape) for k, v in tensors.items()}
        assert got == expected, part
    extra = sorted(parts.get(EXTRA, {}))
    if cfg.family == "sd2":  # the last OpenCLIP block, text_projection and logit_scale
        prefix = "cond_stage_model.model."
        assert extra[:2] == [prefix + "logit_scale", prefix + "text_projection"]
        assert len(extra) == 14 and all(k.startswith(prefix + "transformer.resblocks.23.")
                                        for k in extra[2:])  # fmt: skip
    else:
        assert extra == (["conditioner.embedders.1.model.logit_scale"] if cfg.conditioner else [])
