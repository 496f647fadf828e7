"""Seeded random checkpoints for parity tests and benchmarks (no real weights exist here)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch

from ldm_cli.checkpoints.save import save_checkpoint
from ldm_cli.core.config import TINY_SD1, ModelConfig

# TINY_SD1 with one resolution level: every kind of U-Net block (ResBlock, SpatialTransformer,
# time embedding) in half the kernels, for tests that compile the U-Net
ONE_LEVEL_SD1 = TINY_SD1.with_(
    unet=replace(
        TINY_SD1.unet, channel_mult=(1,), attention_resolutions=(1,), transformer_depth=(1,)
    )
)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter with seeded values that keep activations O(1).

    Norm scales become ~1, biases small, weights uniform with a fan-in bound; unlike the
    original init no layer is left at zero, so every code path is exercised.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        is_norm = "norm" in name or re.search(r"(^|\.)ln_", name)  # ln_*: open_clip's norms
        if p.ndim == 1 and is_norm:
            values = (
                1 + 0.1 * torch.randn(p.shape, generator=gen)
                if name.endswith("weight")
                else (0.1 * torch.randn(p.shape, generator=gen))
            )
        elif p.ndim <= 1:  # biases, and open_clip's scalar logit_scale
            values = 0.05 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
            bound = gain * math.sqrt(3.0 / max(1, fan_in))
            if "embedding" in name:
                bound = 0.5
            values = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
        p.copy_(values.to(p.dtype))
    return module


def random_checkpoint(
    cfg: ModelConfig,
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    with_metadata: bool = True,
    real_extras: bool = True,
) -> Path:
    """Write a checkpoint of `cfg` with seeded random weights in the original layout."""
    from ldm_cli.models.latent_diffusion import LatentDiffusion

    path = Path(path)
    with torch.device("meta"):  # skip the default init: every parameter is overwritten
        model = LatentDiffusion(cfg)
    model = randomize_(model.to_empty(device="cpu"), seed)
    state = model.state_dict()
    if real_extras:
        state.update(training_extras(cfg))
    return save_checkpoint(state, path, cfg if with_metadata else None, dtype)


def training_extras(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The non-parameter tensors a real CompVis checkpoint carries (schedule buffers, EMA
    bookkeeping, CLIP position ids), so loaders are tested against the real file layout."""
    s = cfg.schedule
    betas = torch.linspace(s.beta_start**0.5, s.beta_end**0.5, s.num_train_timesteps) ** 2
    betas = betas.double()
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    post_var = betas * (1 - a_prev) / (1 - a)
    extras = {
        "betas": betas,
        "alphas_cumprod": a,
        "alphas_cumprod_prev": a_prev,
        "sqrt_alphas_cumprod": a.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - a).log(),
        "sqrt_recip_alphas_cumprod": a.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a),
        "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a),
    }
    extras = {k: v.float() for k, v in extras.items()}
    if cfg.family == "x4-upscaler":
        # ImageConcatWithNoiseAugmentation's buffers; its schedule is the U-Net's (1e-4..2e-2)
        for name in (
            "betas",
            "alphas_cumprod",
            "alphas_cumprod_prev",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
        ):
            extras[f"low_scale_model.{name}"] = extras[name].clone()
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    if cfg.text.kind == "clip":  # open_clip keeps no position ids
        position_ids = torch.arange(cfg.text.max_position_embeddings)[None]
        owner = "conditioner.embedders.0" if cfg.conditioner else "cond_stage_model"  # SDXL
        extras[f"{owner}.transformer.text_model.embeddings.position_ids"] = position_ids
    return extras


def write_sparse_checkpoint(
    path: str | Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16"
) -> Path:
    """A safetensors file with these tensors' header and no data: the data region is a hole
    (a sparse file), so a full-size layout (FLUX.1's 23.8 GB) costs no disk or memory. Only
    headers can be read from it."""
    import json
    import struct

    from ldm_cli.checkpoints.header import DTYPE_SIZES

    header, offset = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def flow_layout(cfg, parts: tuple[str, ...] = ("model",)) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a flow model's parts, built on the meta device: "model" (the
    transformer, under model.diffusion_model.), "vae", "text" (keys of an all-in-one file)."""
    from ldm_cli.models.flow_loading import build_empty_flow

    prefixes = {"model": "model.", "vae": "first_stage_model.", "text": "text_encoders."}
    wanted = tuple(prefixes[p] for p in parts)
    state = build_empty_flow(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if k.startswith(wanted)}


def _tiny_flow_configs():
    """Tiny FLUX dev/schnell and SD 3.5 Medium-shaped models for fast tests: every part and
    code path of the real ones (MMDiT-X blocks, qk norms, guidance input, T5) in few channels;
    heads 32 wide so RoPE's axes read back from shapes (4 + 14 + 14)."""
    from ldm_cli.core.flow_config import (
        FLUX_DEV,
        SD35_MEDIUM,
        FluxConfig,
        MMDiTConfig,
        T5Config,
    )

    t5 = T5Config(d_model=64, d_kv=32, d_ff=96, num_layers=2, num_heads=2)
    # one 32-wide head: detection reads CLIP heads as width // 64 (at least one)
    clip_l = replace(
        TINY_SD1.text, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=1,
    )  # fmt: skip
    vae = replace(
        FLUX_DEV.vae, ch=32, ch_mult=(1, 2), num_res_blocks=1
    )  # 16 latent channels, factor 2: 64 px -> 32x32 latents
    flux = FLUX_DEV.with_(
        transformer=FluxConfig(
            vec_in_dim=32, context_in_dim=64, hidden_size=64, num_heads=2, depth=2,
            depth_single_blocks=2, axes_dim=(4, 14, 14),
        ),
        vae=vae, clip_l=clip_l, t5=t5, default_size=64, default_steps=4,
    )  # fmt: skip
    schnell = flux.with_(
        family="flux-schnell",
        transformer=replace(flux.transformer, guidance_embed=False),
        t5_tokens=256,
        dynamic_shift=False,
        default_guidance=None,
    )
    sd3 = SD35_MEDIUM.with_(
        transformer=MMDiTConfig(
            depth=3, hidden_size=128, num_heads=2, pos_embed_max_size=32, adm_in_channels=64,
            context_in_dim=64, qk_norm=True, x_block_self_attn_layers=(0, 1),
        ),
        vae=replace(vae, scale_factor=1.5305, shift_factor=0.0609),
        clip_l=replace(clip_l, clip_skip=2, projection_dim=32),
        clip_g=replace(
            clip_l, clip_skip=2, projection_dim=32, pad_token_id=0, hidden_act="gelu"
        ),
        t5=t5, default_size=64, default_steps=4,
    )  # fmt: skip
    return flux, schnell, sd3


TINY_FLUX_DEV, TINY_FLUX_SCHNELL, TINY_SD35 = _tiny_flow_configs()


@torch.no_grad()
def random_flow_checkpoint(
    cfg, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """An all-in-one file of the flow model `cfg` (ComfyUI/SD3 layout) with seeded random
    weights; `split_flow_checkpoint` cuts it into the files FLUX ships as."""
    from safetensors.torch import save_file

    from ldm_cli.models.flow_model import FlowDiffusion

    with torch.device("meta"):
        model = FlowDiffusion(cfg)
    model = randomize_(model.to_empty(device="cpu"), seed)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return Path(path)


def split_flow_checkpoint(path: str | Path, folder: str | Path) -> dict[str, Path]:
    """The parts of an all-in-one flow file as separate files in FLUX's layouts: the bare
    transformer (BFL keys), ae (encoder.*/decoder.*), clip_l (text_model.*), t5xxl (encoder.*,
    shared.weight); by part name ("model", "vae", "clip_l", "clip_g", "t5")."""
    from safetensors.torch import load_file, save_file

    state, folder = load_file(str(path)), Path(folder)
    prefixes = {
        "model": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "clip_l": "text_encoders.clip_l.transformer.",
        "clip_g": "text_encoders.clip_g.transformer.",
        "t5": "text_encoders.t5xxl.transformer.",
    }
    files = {}
    for part, prefix in prefixes.items():
        tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if tensors:
            files[part] = folder / f"{part}.safetensors"
            save_file(tensors, str(files[part]))
    return files


def write_gguf(
    tensors: dict[str, torch.Tensor], path: str | Path, type_name: str = "Q8_0", arch="flux"
) -> Path:
    """A GGUF file of `tensors` as city96's converter lays it out: 2-d weights whose rows
    divide into blocks quantised to `type_name`, the rest (biases, norms) kept F32."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(str(path), arch)
    for name, tensor in tensors.items():
        data = tensor.float().numpy()
        if data.ndim == 2 and data.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
