"""The CLIP text encoder against transformers' CLIPTextModel loaded through diffusers' converter."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_cli.config import TINY_SD1, TextConfig
from ldm_cli.models.text_encoder import CLIPTextEncoder, clip_text_config
from ldm_cli.tokenizer import get_tokenizer

pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint  # noqa: E402

TOLERANCE = 1e-5
CLIP_VIT_L_PARAMETERS = 123_060_480
POSITION_IDS = "transformer.text_model.embeddings.position_ids"
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "castle, " * 50]


def randomized_encoder(cfg: TextConfig, seed: int = 0) -> CLIPTextEncoder:
    """An encoder whose every weight (layer norms included) is random, not at its init."""
    encoder = CLIPTextEncoder(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            parameter.copy_(noise + (1.0 if "layer_norm" in name and "weight" in name else 0.0))
    return encoder


def sd_checkpoint(encoder: CLIPTextEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights as an SD 1.x checkpoint holds them, position_ids included."""
    checkpoint = {f"cond_stage_model.{k}": v for k, v in encoder.state_dict().items()}
    checkpoint[f"cond_stage_model.{POSITION_IDS}"] = torch.arange(77).unsqueeze(0)
    return checkpoint


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Our tiny encoder and a plain CLIPTextModel that loaded the same SD-format weights through
    diffusers' ``convert_ldm_clip_checkpoint`` and transformers' ``from_pretrained``."""
    ours = randomized_encoder(TINY_SD1.text)
    converted = convert_ldm_clip_checkpoint(sd_checkpoint(ours))
    folder = tmp_path_factory.mktemp("clip_text")
    save_file({k: v.contiguous() for k, v in converted.items()}, folder / "model.safetensors")
    # SD 1.x's config keeps the legacy eos_token_id=2: pooling at the argmax of the ids.
    reference_config = clip_text_config(TINY_SD1.text)
    reference_config.eos_token_id = 2
    reference_config.save_pretrained(folder)
    reference, info = CLIPTextModel.from_pretrained(
        folder, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    return ours, reference.eval()


def tiny_tokens() -> torch.Tensor:
    sd1 = get_tokenizer()(PROMPTS)
    openclip_padded = get_tokenizer(0)(PROMPTS)
    return torch.cat([sd1, openclip_padded])


@torch.no_grad()
def test_last_layer_and_pooled_match_transformers(tiny_pair):
    ours, reference = tiny_pair
    tokens = tiny_tokens()
    expected = reference(input_ids=tokens)
    context, pooled = ours.forward_with_pooled(tokens)
    assert context.shape == (len(tokens), 77, TINY_SD1.text.hidden_size)
    assert (context - expected.last_hidden_state).abs().max() <= TOLERANCE
    assert (pooled - expected.pooler_output).abs().max() <= TOLERANCE
    assert torch.equal(ours(tokens), context)
    assert torch.equal(ours.pooled(tokens), pooled)


@torch.no_grad()
def test_clip_skip_2_is_penultimate_layer_with_final_norm(tiny_pair):
    ours, reference = tiny_pair
    skipping = CLIPTextEncoder(replace(TINY_SD1.text, clip_skip=2)).eval()
    skipping.load_state_dict(ours.state_dict())
    tokens = tiny_tokens()
    hidden_states = reference(input_ids=tokens, output_hidden_states=True).hidden_states
    expected = reference.final_layer_norm(hidden_states[-2])
    assert (skipping(tokens) - expected).abs().max() <= TOLERANCE
    assert (skipping(tokens) - ours(tokens)).abs().max() > 1e-3


def test_clip_skip_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="clip_skip"):
        CLIPTextEncoder(replace(TINY_SD1.text, clip_skip=3))


@torch.no_grad()
def test_meta_build_loaded_with_assign_has_real_position_ids(tiny_pair):
    ours, _ = tiny_pair
    with torch.device("meta"):
        lazy = CLIPTextEncoder(TINY_SD1.text)
    assert lazy.text_model.embeddings.position_ids.is_meta
    result = lazy.load_state_dict(ours.state_dict(), assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    position_ids = lazy.text_model.embeddings.position_ids
    assert not position_ids.is_meta
    assert torch.equal(position_ids, torch.arange(77).unsqueeze(0))
    assert not any(t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
    tokens = tiny_tokens()
    assert torch.equal(lazy.eval()(tokens), ours(tokens))


def test_full_size_parameters_and_keys_match_sd15(reference_dir):
    with torch.device("meta"):
        ours = CLIPTextEncoder(TextConfig())
    assert sum(p.numel() for p in ours.parameters()) == CLIP_VIT_L_PARAMETERS

    config_path = os.path.join(reference_dir, "sd15", "text_encoder", "config.json")
    reference_config = CLIPTextConfig.from_json_file(config_path)
    with torch.device("meta"):
        reference = CLIPTextModel(reference_config)
    expected = {f"transformer.text_model.{k}": v.shape for k, v in reference.state_dict().items()}
    actual = {k: v.shape for k, v in ours.state_dict().items()}
    assert actual == expected
    assert POSITION_IDS not in actual

    with open(config_path) as f:
        fields = json.load(f)
    ours_config = clip_text_config(TextConfig()).to_dict()
    for name in ("hidden_act", "layer_norm_eps", "max_position_embeddings", "vocab_size"):
        assert ours_config[name] == fields[name]


@torch.no_grad()
def test_encode_prompts_end_to_end():
    encoder = randomized_encoder(TINY_SD1.text, seed=1)
    context = encoder.encode(["a red cube on a table", "(masterpiece:1.2), 東京 😀"])
    assert context.shape == (2, 77, TINY_SD1.text.hidden_size)
    assert context.dtype == torch.float32 and torch.isfinite(context).all()
    tokens = get_tokenizer()(["a red cube on a table"])
    torch.testing.assert_close(encoder(tokens), context[:1], rtol=0, atol=1e-6)
