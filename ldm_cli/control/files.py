"""ControlNet files, detected by their tensors and loaded into `models.controlnet.ControlNet`.

Layouts:

- original (lllyasviel's v1.0/v1.1 files, A1111's extension): ``control_model.*`` or
  ``model.control_model.*`` keys in our module's names, .safetensors or .pth (--allow-pickle);
- diffusers (``controlnet_cond_embedding.*``, ``down_blocks.*``, ``controlnet_down_blocks.*``,
  ``controlnet_mid_block.*``), one file or a folder with ``diffusion_pytorch_model.safetensors``:
  how SDXL ControlNets ship. Renamed to the original names: the U-Net part through
  `checkpoints.diffusers_unet`, the rest by `CONTROL_RENAMES`; the load is strict, so every
  tensor is shape-checked.

The architecture is read off the shapes; the attention heads, which shapes cannot tell, are the
base model's (a ControlNet is a copy of its encoder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ldm_cli.checkpoints.detect.shapes import UNET, count_indices, infer_unet, require
from ldm_cli.checkpoints.diffusers_unet import block_kinds, diffusers_unet_path
from ldm_cli.checkpoints.header import CheckpointHeader, TensorInfo
from ldm_cli.checkpoints.small_files import read_tensors
from ldm_cli.core.config import UNetConfig
from ldm_cli.core.errors import UserError
from ldm_cli.models.controlnet import ControlNet
from ldm_cli.models.t2i_adapter import T2IAdapter
from ldm_cli.ops import narrow_weights
from ldm_cli.ops.conv_linear import Linear
from ldm_cli.ops.winograd_conv import WinogradConv2d

ORIGINAL_PREFIXES = ("model.control_model.", "control_model.")
DIFFUSERS_MARK = "controlnet_cond_embedding.conv_in.weight"
ADAPTER_MARK = "adapter.conv_in.weight"
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
# diffusers' ControlNet-only modules -> ours (the hint embedding's convolutions: conv_in, then
# blocks 0..5, then conv_out, every other module of input_hint_block, SiLUs between them)
CONTROL_RENAMES = {
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    **{f"controlnet_cond_embedding.blocks.{k}": f"input_hint_block.{2 * k + 2}" for k in range(6)},
    "controlnet_mid_block": "middle_block_out.0",
}  # conv_out: the last convolution of input_hint_block (14 for four widths)
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclass(frozen=True)
class ControlFile:
    """A ControlNet file read: its tensors in our names, the layout and the encoder's shape."""

    path: Path
    layout: str  # "original" or "diffusers" (ControlNets); "t2i-adapter"
    state: dict[str, torch.Tensor]
    config: UNetConfig | None  # None for T2I-Adapters, which copy no U-Net part

    @property
    def is_adapter(self) -> bool:
        return self.layout == "t2i-adapter"


def family_name(cfg: UNetConfig) -> str:
    """What kind of model a U-Net (or ControlNet) of this shape belongs to, in words."""
    if cfg.adm_in_channels is None and cfg.context_dim in (768, 1024):
        return CONTEXT_FAMILIES[cfg.context_dim]
    if cfg.adm_in_channels is not None and cfg.context_dim == 2048:
        return "SDXL"
    name = f"a model with {cfg.context_dim}-wide text features"
    if cfg.adm_in_channels is not None:
        name += f" and a {cfg.adm_in_channels}-wide size vector"
    return name


def read_control_file(path: str | Path) -> ControlFile:
    path = Path(path)
    if not path.exists():
        raise UserError(f"ControlNet not found: {path}")
    weights = _weights_file(path)
    state, _ = read_tensors(weights, "ControlNet")
    for prefix in ORIGINAL_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if "input_hint_block.0.weight" in state:
        return ControlFile(path, "original", state, _original_config(path, state))
    if DIFFUSERS_MARK in state:
        cfg = _diffusers_config(path, state)
        return ControlFile(path, "diffusers", _from_diffusers(path, state, cfg), cfg)
    if ADAPTER_MARK in state:
        if any(".out_conv." in k for k in state):
            raise UserError(f"{path.name} is a light T2I-Adapter; only full ones are supported")
        return ControlFile(path, "t2i-adapter", state, None)
    example = next(iter(state), "nothing")
    raise UserError(
        f"{path.name} is not a ControlNet or T2I-Adapter of a known layout (no "
        f"input_hint_block.*, controlnet_cond_embedding.* or adapter.* tensors; it holds e.g. "
        f"{example!r})"
    )


def _weights_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).exists():
            return path / name
    raise UserError(f"{path} holds no ControlNet weights ({' or '.join(DIFFUSERS_WEIGHTS)})")


def _header(path: Path, state: dict[str, torch.Tensor], prefix: str = "") -> CheckpointHeader:
    """The tensors' names and shapes as detection reads a checkpoint header."""
    tensors = {prefix + k: TensorInfo("F32", tuple(v.shape)) for k, v in state.items()}
    return CheckpointHeader(path, tensors, {})


def _original_config(path: Path, state: dict[str, torch.Tensor]) -> UNetConfig:
    cfg = infer_unet(_header(path, state, UNET))
    return replace(cfg, out_channels=cfg.in_channels)


def _diffusers_config(path: Path, state: dict[str, torch.Tensor]) -> UNetConfig:
    header = _header(path, state)
    model_channels, in_channels = require(header, "conv_in.weight")[:2]
    levels = count_indices(header, r"down_blocks\.(\d+)\.")
    layers = count_indices(header, r"down_blocks\.0\.resnets\.(\d+)\.")
    mult, depths = [], []
    for b in range(levels):
        width = require(header, f"down_blocks.{b}.resnets.0.conv1.weight")[0]
        mult.append(width // model_channels)
        blocks = rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\."
        depths.append(count_indices(header, blocks))
    context = next((v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")), 768)
    proj = next((v for k, v in state.items() if k.endswith("proj_in.weight")), None)
    adm = state.get("add_embedding.linear_1.weight")
    return UNetConfig(
        in_channels=in_channels,
        out_channels=in_channels,
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=layers,
        attention_resolutions=tuple(
            sorted((2**b for b, d in enumerate(depths) if d), reverse=True)
        ),
        transformer_depth=tuple(depths),
        transformer_depth_middle=count_indices(
            header, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."
        ),
        context_dim=context,
        use_linear_in_transformer=proj is not None and proj.ndim == 2,
        adm_in_channels=adm.shape[1] if adm is not None else None,
    )


def _from_diffusers(path: Path, state: dict, cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers' names -> ours for every tensor of a ControlNet of `cfg`'s shape."""
    blocks = count_indices(_header(path, state), r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    widths = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    widths += [
        state[f"controlnet_cond_embedding.blocks.{k}.weight"].shape[0] for k in range(1, blocks, 2)
    ]
    channels = state["controlnet_cond_embedding.conv_in.weight"].shape[1]
    with torch.device("meta"):
        model = ControlNet(cfg, channels, tuple(widths))
    kinds = block_kinds(model)
    last_hint = f"input_hint_block.{len(model.input_hint_block) - 1}"
    out = {}
    for key in model.state_dict():
        module, _, param = key.rpartition(".")
        source = _diffusers_name(module, cfg.num_res_blocks, kinds, last_hint)
        if source is None or f"{source}.{param}" not in state:
            raise UserError(f"{path.name}: no tensor for {key} (diffusers {source}.{param})")
        out[key] = state[f"{source}.{param}"]
    return out


def _diffusers_name(module: str, layers: int, kinds: dict[str, str], last_hint: str) -> str | None:
    if module == last_hint:
        return "controlnet_cond_embedding.conv_out"
    for theirs, ours in CONTROL_RENAMES.items():
        if module == ours:
            return theirs
    match = re.fullmatch(r"zero_convs\.(\d+)\.0", module)
    if match:
        return f"controlnet_down_blocks.{match.group(1)}"
    return diffusers_unet_path(module, layers, kinds)


def build_adapter(
    file: ControlFile, base: UNetConfig, latent_factor: int, device: torch.device, dtype
) -> T2IAdapter:
    """The T2I-Adapter of `file` for a U-Net of config `base` whose latents are 1/`latent_factor`
    of the image: SDXL's layout when it unshuffles by twice that."""
    state = file.state
    header = _header(file.path, state)
    first = state[ADAPTER_MARK].shape
    blocks = count_indices(header, r"adapter\.body\.(\d+)\.")
    channels = tuple(
        state[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0] for i in range(blocks)
    )
    res_blocks = count_indices(header, r"adapter\.body\.0\.resnets\.(\d+)\.")
    unshuffle = next(
        (f for f in (2 * latent_factor, latent_factor) if first[1] % (f * f) == 0), None
    )
    widths = [base.model_channels * m for m in base.channel_mult]
    xl = unshuffle == 2 * latent_factor and first[1] // unshuffle**2 in (1, 3)
    if unshuffle is None or list(channels[: len(widths)]) != widths:
        raise UserError(
            f"{file.path.name} is a T2I-Adapter for a U-Net of widths {list(channels)}, not for "
            f"this model ({widths})"
        )
    in_channels = first[1] // unshuffle**2
    with torch.device("meta"):
        model = T2IAdapter(in_channels, channels, res_blocks, unshuffle, xl)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    return load_strict(model, state, file, "a T2I-Adapter")


def build_controlnet(
    file: ControlFile, base: UNetConfig, device: torch.device, dtype: torch.dtype
) -> ControlNet:
    """The ControlNet of `file` for a U-Net of config `base`, or a one-line UserError naming
    both when it belongs to another family or size of model."""
    check_fits(file, base)
    cfg = replace(file.config, num_heads=base.num_heads, num_head_channels=base.num_head_channels)
    with torch.device("meta"):
        model = ControlNet(cfg, *hint_shape(file.state))
    kept = narrow_keys(model, file.state, torch.device(device), dtype)
    state = {
        k: v.to(device=device) if k in kept else v.to(device=device, dtype=dtype)
        for k, v in file.state.items()
    }
    return load_strict(model, state, file, "a ControlNet")


def load_strict(model, state: dict, file: ControlFile, what: str):
    """`model` (built on the meta device) given `state` strictly, frozen for inference; a
    one-line UserError naming the first mismatch otherwise."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise UserError(f"{file.path.name}: does not load as {what} ({first})") from None
    return model.requires_grad_(False).eval()


def narrow_keys(model: ControlNet, state: dict, device: torch.device, dtype) -> set[str]:
    """The weights an fp16/bf16 file keeps narrow when run in fp32 on the CPU, widened per call
    as the U-Net's are (ops.narrow_weights): those of its large 3x3 convolutions and linear
    layers."""
    if device.type != "cpu" or dtype != torch.float32:
        return set()
    keys = set()
    for name, module in model.named_modules():
        weight = state.get(f"{name}.weight")
        if not isinstance(module, WinogradConv2d | Linear) or weight is None:
            continue
        narrow = weight.dtype in (torch.float16, torch.bfloat16)
        if narrow and weight.numel() * dtype.itemsize >= narrow_weights.MIN_BYTES:
            keys.add(f"{name}.weight")
    return keys


def hint_shape(state: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(control image channels, hint widths) of an original-layout state (models.controlnet)."""
    convs = sorted(
        int(m.group(1)) for k in state if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k))
    )
    outs = [state[f"input_hint_block.{i}.weight"].shape[0] for i in convs]
    channels = state[f"input_hint_block.{convs[0]}.weight"].shape[1]
    return channels, (outs[0], *outs[2:-1:2])


def check_fits(file: ControlFile, base: UNetConfig) -> None:
    cn, unet = file.config, base
    theirs, ours = family_name(cn), family_name(unet)
    if theirs != ours or cn.adm_in_channels != unet.adm_in_channels:
        raise UserError(
            f"{file.path.name} is a ControlNet for {theirs}, not for this model ({ours})"
        )
    shape = ("model_channels", "channel_mult", "num_res_blocks")
    if any(getattr(cn, k) != getattr(unet, k) for k in shape):
        raise UserError(
            f"{file.path.name} is a ControlNet for a U-Net of another size "
            f"({cn.model_channels} channels x {cn.channel_mult}; the model's: "
            f"{unet.model_channels} x {unet.channel_mult})"
        )
    if cn.in_channels != 4 and cn.in_channels != unet.out_channels:
        raise UserError(f"{file.path.name}: a ControlNet for {cn.in_channels}-channel latents")
