"""diffusers' and transformers' side of the flow models (FLUX.1, SD3/3.5), built from our weights.

Each builder takes one part's state dict in our layout (the keys of that part in an all-in-one
file, prefix removed: `part_state`) and returns the reference model holding the same weights:

- the FLUX transformer: BFL keys mapped to FluxTransformer2DModel's by `flux_to_diffusers`, for
  any width (diffusers' own converter assumes 3072);
- the SD3 transformer: SD3Transformer2DModel through diffusers' own `from_single_file`;
- CLIP-L/G and T5: transformers' CLIPTextModel(WithProjection) and T5EncoderModel;
- the 16-channel VAE: AutoencoderKL through diffusers' `from_single_file`;
- the real tokenizers from ../shared/reference (`flow_tokenizers`).

diffusers and transformers are imported inside the builders, so a test module that imports
this one still skips (with pytest.importorskip) where they are missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm_cli.core.config import TextConfig, VAEConfig
from ldm_cli.core.flow_config import FluxConfig, MMDiTConfig, T5Config

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}


def part_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def write_config(directory: str | Path, subfolder: str, config: dict) -> Path:
    """`config` as `directory/subfolder/config.json`, a diffusers config folder; `directory`."""
    folder = Path(directory) / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return Path(directory)


# -- FLUX transformer --------------------------------------------------------------------------

# BFL stream -> diffusers' (adaLN, attention output, q/k/v projections, MLP) names
FLUX_DOUBLE_STREAMS = [
    ("img", "norm1", "to_out.0", ("to_q", "to_k", "to_v"), "ff"),
    (
        "txt",
        "norm1_context",
        "to_add_out",
        ("add_q_proj", "add_k_proj", "add_v_proj"),
        "ff_context",
    ),
]


def flux_diffusers_config(cfg: FluxConfig) -> dict:
    """FluxTransformer2DModel's config of the same architecture (its theta is fixed at 10000)."""
    assert cfg.theta == 10_000 and cfg.mlp_ratio == 4.0 and cfg.qkv_bias
    return {
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.axes_dim),
    }


def flux_to_diffusers(state: dict, cfg: FluxConfig) -> dict:
    """BFL keys -> diffusers' for any width (diffusers' own converter assumes 3072)."""
    hidden, mlp = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    out = {}
    for prefix, name in [
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ]:
        for ours, theirs in [("in_layer", "linear_1"), ("out_layer", "linear_2")]:
            for kind in ("weight", "bias"):
                key = f"{prefix}.{ours}.{kind}"
                if key in state:
                    out[f"time_text_embed.{name}.{theirs}.{kind}"] = state[key]
    for kind in ("weight", "bias"):
        out[f"x_embedder.{kind}"] = state[f"img_in.{kind}"]
        out[f"context_embedder.{kind}"] = state[f"txt_in.{kind}"]
        out[f"proj_out.{kind}"] = state[f"final_layer.linear.{kind}"]
        shift, scale = state[f"final_layer.adaLN_modulation.1.{kind}"].chunk(2)
        out[f"norm_out.linear.{kind}"] = torch.cat([scale, shift])
    for i in range(cfg.depth):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for stream, norm, attn, qkv, ff in FLUX_DOUBLE_STREAMS:
            for kind in ("weight", "bias"):
                out[f"{dst}{norm}.linear.{kind}"] = state[f"{src}{stream}_mod.lin.{kind}"]
                out[f"{dst}attn.{attn}.{kind}"] = state[f"{src}{stream}_attn.proj.{kind}"]
                out[f"{dst}{ff}.net.0.proj.{kind}"] = state[f"{src}{stream}_mlp.0.{kind}"]
                out[f"{dst}{ff}.net.2.{kind}"] = state[f"{src}{stream}_mlp.2.{kind}"]
                chunks = state[f"{src}{stream}_attn.qkv.{kind}"].chunk(3)
                for proj, chunk in zip(qkv, chunks, strict=True):
                    out[f"{dst}attn.{proj}.{kind}"] = chunk
            added = "" if stream == "img" else "added_"
            for qk in ("query", "key"):
                out[f"{dst}attn.norm_{added}{qk[0]}.weight"] = state[
                    f"{src}{stream}_attn.norm.{qk}_norm.scale"
                ]
    for i in range(cfg.depth_single_blocks):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}norm.linear.{kind}"] = state[f"{src}modulation.lin.{kind}"]
            out[f"{dst}proj_out.{kind}"] = state[f"{src}linear2.{kind}"]
            parts = state[f"{src}linear1.{kind}"].split([hidden, hidden, hidden, mlp])
            for proj, part in zip(("to_q", "to_k", "to_v", "proj_mlp"), parts, strict=True):
                out[f"{dst}{'' if proj == 'proj_mlp' else 'attn.'}{proj}.{kind}"] = part
        for qk in ("query", "key"):
            out[f"{dst}attn.norm_{qk[0]}.weight"] = state[f"{src}norm.{qk}_norm.scale"]
    return out


def flux_reference(cfg: FluxConfig, state: dict) -> torch.nn.Module:
    """diffusers' FluxTransformer2DModel holding `state` (BFL keys), every weight loaded."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_config(flux_diffusers_config(cfg))
    model.load_state_dict(flux_to_diffusers(state, cfg), strict=True)
    return model.eval()


# -- SD3 transformer ---------------------------------------------------------------------------


def sd3_diffusers_config(cfg: MMDiTConfig) -> dict:
    """SD3Transformer2DModel's config of the same architecture."""
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.depth,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": cfg.adm_in_channels,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        # not read from the file: the conversion writes the keys, the config builds the model
        "dual_attention_layers": list(cfg.x_block_self_attn_layers),
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
    }


def sd3_from_single_file(cfg: MMDiTConfig, checkpoint, directory: str | Path) -> torch.nn.Module:
    """diffusers' SD3Transformer2DModel read by its own `from_single_file` from `checkpoint` (a
    file or state dict with `model.diffusion_model.` keys, an all-in-one file included), with
    a config folder for `cfg` written under `directory`."""
    from diffusers import SD3Transformer2DModel

    config = write_config(directory, "transformer", sd3_diffusers_config(cfg))
    return SD3Transformer2DModel.from_single_file(
        str(checkpoint) if isinstance(checkpoint, Path) else checkpoint,
        config=str(config),
        subfolder="transformer",
        local_files_only=True,
        torch_dtype=torch.float32,
    ).eval()


def sd3_reference(cfg: MMDiTConfig, state: dict, directory: str | Path) -> torch.nn.Module:
    """diffusers' model of `state` (our MMDiT keys), saved as a released single file would be."""
    from safetensors.torch import save_file

    path = Path(directory) / "sd3.safetensors"
    save_file({TRANSFORMER_PREFIX + k: v.contiguous() for k, v in state.items()}, str(path))
    return sd3_from_single_file(cfg, path, directory)


# -- text encoders -----------------------------------------------------------------------------


def reference_t5(cfg: T5Config, state: dict) -> torch.nn.Module:
    """transformers' T5EncoderModel holding `state` (the t5xxl file's keys)."""
    import transformers

    config = transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj=cfg.feed_forward_proj,
        dense_act_fn="gelu_new",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = transformers.T5EncoderModel(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["encoder.embed_tokens.weight"] and not unexpected  # the tied alias
    assert torch.equal(model.encoder.embed_tokens.weight, model.shared.weight)
    return model


def reference_clip(cfg: TextConfig, state: dict) -> torch.nn.Module:
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection where `cfg` has a
    projection, holding `state` (the clip_l/clip_g files' keys)."""
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim or cfg.hidden_size,
        bos_token_id=49406,
        eos_token_id=2,  # what the hub configs of FLUX's and SD3's CLIPs say (argmax pooling)
        pad_token_id=1,
    )
    with_projection = cfg.projection_dim is not None
    cls = (
        transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    )
    model = cls(config).eval()
    if not with_projection:  # transformers 5's CLIPTextModel is the text model itself
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


def flow_tokenizers(reference_dir: str) -> SimpleNamespace:
    """The real tokenizers diffusers' pipelines take: `clip` (SD 1.5's, CLIP-L), `clip_g`
    (SDXL's tokenizer_2, the same file as SD3's) and `t5`; skips the test where one is absent."""
    import transformers

    paths = {
        "clip": os.path.join(reference_dir, "sd15", "tokenizer"),
        "clip_g": os.path.join(reference_dir, "sdxl-base", "tokenizer_2"),
        "t5": os.path.join(reference_dir, "t5", "tokenizer.json"),
    }
    for path in paths.values():
        if not os.path.exists(path):
            pytest.skip(f"{path} not present")
    return SimpleNamespace(
        clip=transformers.CLIPTokenizer.from_pretrained(paths["clip"]),
        clip_g=transformers.CLIPTokenizer.from_pretrained(paths["clip_g"]),
        t5=transformers.T5TokenizerFast(tokenizer_file=paths["t5"]),
    )


# -- VAE ---------------------------------------------------------------------------------------


def vae_diffusers_config(cfg: VAEConfig) -> dict:
    """diffusers' AutoencoderKL config of the same 16-channel, quant-conv-free architecture."""
    levels = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "latent_channels": cfg.z_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_add_attention": True,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.resolution,
        "scaling_factor": cfg.scale_factor,
        "shift_factor": cfg.shift_factor,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_quant_conv,
    }


def vae_from_single_file(checkpoint, config_dir: str | Path) -> torch.nn.Module:
    """diffusers' AutoencoderKL from the single file (a path or a state dict with ae.safetensors'
    keys) and a config folder holding `vae/config.json`."""
    import diffusers

    model = diffusers.AutoencoderKL.from_single_file(
        checkpoint, config=str(config_dir), subfolder="vae", local_files_only=True
    )
    assert not any(p.is_meta for p in model.parameters())  # every weight came from the file
    return model.eval()


def vae_reference(cfg: VAEConfig, checkpoint, directory: str | Path) -> torch.nn.Module:
    """diffusers' AutoencoderKL of `checkpoint` (a path or a state dict with ae.safetensors'
    keys), configured for `cfg` by a config folder written under `directory`."""
    config = write_config(directory, "vae", vae_diffusers_config(cfg))
    return vae_from_single_file(checkpoint, config)
