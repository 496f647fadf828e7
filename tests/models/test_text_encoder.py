"""The plain-PyTorch CLIP text encoder against transformers' CLIPTextModel, the reference it
replaces: directly on shared weights, and through diffusers' checkpoint converter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_cli.core.config import TINY_SD1, TextConfig
from ldm_cli.models.clip_text_model import CLIPTextModel as OurCLIPTextModel
from ldm_cli.models.text_encoder import CLIPTextEncoder
from ldm_cli.text.tokenizer import get_tokenizer

pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint  # noqa: E402

TOLERANCE = 1e-6
PREFIX = "transformer.text_model."
CLIP_VIT_L_PARAMETERS = 123_060_480
POSITION_IDS = "transformer.text_model.embeddings.position_ids"
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "castle, " * 50]


def clip_text_config(cfg: TextConfig, eos_token_id: int = 49407) -> CLIPTextConfig:
    """transformers' configuration of the same text model (what the encoder used to build)."""
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=49406,
        eos_token_id=eos_token_id,
        pad_token_id=cfg.pad_token_id,
        attn_implementation="sdpa",
    )


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
    reference_config = clip_text_config(TINY_SD1.text, eos_token_id=2)
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
    lazy.materialize_buffers()  # a no-op kept for callers
    position_ids = lazy.text_model.embeddings.position_ids
    assert torch.equal(position_ids, torch.arange(77).unsqueeze(0))
    assert not list(lazy.buffers())
    assert not any(t.is_meta for t in lazy.parameters())
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
    expected = {PREFIX + k: v.shape for k, v in reference.state_dict().items()}
    actual = {k: v.shape for k, v in ours.state_dict().items()}
    assert actual == expected
    assert POSITION_IDS not in actual

    with open(config_path) as f:
        fields = json.load(f)
    for name in ("hidden_act", "layer_norm_eps", "max_position_embeddings", "vocab_size"):
        assert getattr(TextConfig(), name) == fields[name]


@torch.no_grad()
def test_encode_prompts_end_to_end():
    encoder = randomized_encoder(TINY_SD1.text, seed=1)
    context = encoder.encode(["a red cube on a table", "(masterpiece:1.2), 東京 😀"])
    assert context.shape == (2, 77, TINY_SD1.text.hidden_size)
    assert context.dtype == torch.float32 and torch.isfinite(context).all()
    tokens = get_tokenizer()(["a red cube on a table"])
    torch.testing.assert_close(encoder(tokens), context[:1], rtol=0, atol=1e-6)


def reference_model(encoder: CLIPTextEncoder) -> CLIPTextModel:
    """transformers' model (pooling at the first end token) holding the encoder's weights."""
    reference = CLIPTextModel(clip_text_config(encoder.cfg)).eval()
    state = {k.removeprefix(PREFIX): v for k, v in encoder.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    return reference


def edge_tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Random ids, with end tokens in the middle, at the start, or missing altogether."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size - 1, (4, 77), generator=generator)
    tokens[0, [20, 40]] = 49407
    tokens[1, 0] = 49407
    tokens[2, 76] = 49407
    return tokens


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_every_output_matches_transformers_on_shared_weights(hidden_act):
    cfg = replace(TINY_SD1.text, hidden_act=hidden_act, num_hidden_layers=3)
    ours = randomized_encoder(cfg, seed=2)
    reference = reference_model(ours)
    for tokens in (tiny_tokens(), edge_tokens(cfg.vocab_size), tiny_tokens()[:, :16]):
        expected = reference(input_ids=tokens, output_hidden_states=True)
        actual = ours.text_model(tokens, output_hidden_states=True)
        assert (actual.last_hidden_state - expected.last_hidden_state).abs().max() <= TOLERANCE
        assert (actual.pooler_output - expected.pooler_output).abs().max() <= TOLERANCE
        assert len(actual.hidden_states) == len(expected.hidden_states) == 4
        for mine, theirs in zip(actual.hidden_states, expected.hidden_states, strict=True):
            assert (mine - theirs).abs().max() <= TOLERANCE
        assert ours.text_model(tokens).hidden_states is None
        for skip in range(1, 4):
            skipping = CLIPTextEncoder(replace(cfg, clip_skip=skip)).eval()
            skipping.load_state_dict(ours.state_dict())
            context, pooled = skipping.forward_with_pooled(tokens)
            normed = reference.final_layer_norm(expected.hidden_states[-skip])
            assert (context - normed).abs().max() <= TOLERANCE
            assert torch.equal(pooled, actual.pooler_output)


def test_state_dict_keys_and_shapes_equal_transformers():
    ours = CLIPTextEncoder(TINY_SD1.text)
    reference = CLIPTextModel(clip_text_config(TINY_SD1.text))
    expected = [(PREFIX + k, v.shape) for k, v in reference.state_dict().items()]
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == expected
    bare = OurCLIPTextModel(TINY_SD1.text).state_dict()
    assert list(bare) == list(reference.state_dict())


def test_seeded_initialization_equals_transformers():
    """Training from scratch starts from exactly the weights the transformers-based encoder had."""
    torch.manual_seed(5)
    reference = CLIPTextModel(clip_text_config(TINY_SD1.text))
    after_reference = torch.rand(4)
    torch.manual_seed(5)
    ours = CLIPTextEncoder(TINY_SD1.text)
    assert torch.equal(torch.rand(4), after_reference)
    expected = reference.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, expected[key.removeprefix(PREFIX)]), key


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextEncoder(replace(TINY_SD1.text, hidden_act="relu"))


def test_runtime_modules_do_not_import_transformers():
    code = (
        "import sys\n"
        "import ldm_cli.models.text_encoder, ldm_cli.text.tokenizer\n"
        "ldm_cli.text.tokenizer.get_tokenizer()(['a photo of a cat, 8k'])\n"
        "print(sorted(m for m in ('transformers', 'ftfy', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
