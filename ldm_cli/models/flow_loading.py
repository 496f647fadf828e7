"""Build a flow model on the meta device and fill it, strictly, from the files it came in.

Every tensor is read from its own file (`checkpoints.flow_sources`) under its all-in-one name.
The transformer's linear weights stored narrower than the compute dtype stay narrow and are
widened per call (`ops.narrow_weights`): an fp16/bf16 file's large ones by default on the CPU
(`narrow`), an fp8 file's (`float8_e4m3fn`, `float8_e5m2`) always, on every device.
"""

from __future__ import annotations

import math

import torch

from ldm_cli.checkpoints.file import open_tensors
from ldm_cli.checkpoints.flow_sources import PART_PREFIXES, TRANSFORMER, VAE, FlowSources
from ldm_cli.checkpoints.gguf_file import GGUFHeader, read_gguf_tensors
from ldm_cli.core.errors import UserError
from ldm_cli.core.flow_config import FlowModelConfig
from ldm_cli.models.flow_model import FlowDiffusion
from ldm_cli.models.loading import SkipMetaInit, key_problems, read_safetensors
from ldm_cli.ops import narrow_weights
from ldm_cli.ops.conv_linear import Linear
from ldm_cli.ops.gguf_weights import PLAIN, dequantize, plain_tensor, quantize_weight_

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
PART_OPTIONS = {prefix: "--" + part.replace("_", "-") for part, prefix in PART_PREFIXES.items()}


def build_empty_flow(cfg: FlowModelConfig) -> FlowDiffusion:
    with torch.device("meta"), SkipMetaInit():
        return FlowDiffusion(cfg)


def check_flow_keys(model: FlowDiffusion, sources: FlowSources) -> None:
    """A UserError naming a missing part (and the option that gives it), missing, unexpected
    or mis-shaped tensors; nothing when the files make exactly this model."""
    name = sources.header.path.name
    missing = _missing(model, sources)
    for prefix, option in PART_OPTIONS.items():
        if missing and all(k.startswith(prefix) for k in missing):
            part = "VAE" if prefix == VAE else prefix.split(".")[1].replace("xxl", "-XXL")
            raise UserError(f"{name} holds no {part} weights: give them with {option} FILE")
    _raise_problems(model, sources, missing)


def check_parts(model: FlowDiffusion, sources: FlowSources) -> None:
    """`check_flow_keys` for the parts the files hold; parts wholly absent are not errors
    (`ldm info` of a bare transformer)."""
    absent = [p for p in (TRANSFORMER, *PART_PREFIXES.values()) if not sources.header.has_prefix(p)]
    missing = [k for k in _missing(model, sources) if not k.startswith(tuple(absent))]
    _raise_problems(model, sources, missing)


def _missing(model: FlowDiffusion, sources: FlowSources) -> list[str]:
    return sorted(set(model.state_dict()) - set(sources.header.tensors))


def _raise_problems(model: FlowDiffusion, sources: FlowSources, missing: list[str]) -> None:
    header = sources.header
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = key_problems(expected, header, list(header.tensors), missing)
    if problems:
        raise UserError(
            f"{header.path.name} does not match the detected {model.config.family} model: "
            + "; ".join(problems)
        )


def narrow_names(
    model: FlowDiffusion, sources: FlowSources, device: torch.device, dtype, narrow: bool
) -> frozenset[str]:
    """The transformer's linear weights kept in the file's narrower type (module docstring)."""
    names = set()
    for name, module in model.named_modules():
        if not name.startswith(TRANSFORMER) or not isinstance(module, Linear):
            continue
        info = sources.header.tensors.get(f"{name}.weight")
        if info is None:
            continue
        large = math.prod(info.shape) * dtype.itemsize >= narrow_weights.MIN_BYTES
        half = info.dtype in ("F16", "BF16") and narrow and device.type == "cpu"
        if info.dtype in FP8_DTYPES or (large and half and dtype == torch.float32):
            names.add(f"{name}.weight")
    return frozenset(names)


def quantized_linears(model: FlowDiffusion, sources: FlowSources, dtype) -> dict[str, str]:
    """Make the linear layers whose weights are GGUF blocks dequantise them per access
    (ops.gguf_weights); all-in-one name of each weight -> the name its blocks load under."""
    blocks = {}
    modules = dict(model.named_modules())
    for name, info in sources.header.tensors.items():
        module = modules.get(name.removesuffix(".weight"))
        if info.dtype in PLAIN or not name.endswith(".weight") or not isinstance(module, Linear):
            continue
        if isinstance(sources.origin[name][0], GGUFHeader):
            raw_shape = _raw_shape(info)
            suffix = quantize_weight_(module, info.dtype, info.shape, dtype, raw_shape)
            blocks[name] = name.removesuffix("weight") + suffix
    return blocks


def _raw_shape(info) -> tuple[int, int]:
    rows = math.prod(info.shape[:-1])
    return (rows, info.nbytes // rows)


def read_gguf_state(source, names: dict[str, str], blocks, device, dtype) -> dict:
    """The tensors of a GGUF file under their all-in-one names: plain ones in `dtype`,
    quantised linear weights as raw blocks (under `blocks`' names), other quantised ones
    dequantised now."""
    stored = read_gguf_tensors(source.path, names.values())
    state = {}
    for name, key in names.items():
        data, type_name, shape = stored[key]
        if type_name in PLAIN:
            state[name] = plain_tensor(data, type_name, shape).to(device, dtype)
        elif name in blocks:
            raw = torch.from_numpy(data).reshape(_raw_shape(source.tensors[key]))
            state[blocks[name]] = raw.to(device)
        else:
            state[name] = dequantize(torch.from_numpy(data), type_name, shape, dtype).to(device)
    return state


def load_flow_model(
    sources: FlowSources,
    cfg: FlowModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    narrow: bool = False,
) -> FlowDiffusion:
    """The model of `cfg` from `sources`, strictly loaded, in eval mode without gradients."""
    device = torch.device(device)
    model = build_empty_flow(cfg)
    check_flow_keys(model, sources)
    kept = narrow_names(model, sources, device, dtype, narrow)
    blocks = quantized_linears(model, sources, dtype)
    state = {}
    for source in sources.files():
        names = {n: key for n, (s, key) in sources.origin.items() if s.path == source.path}
        if isinstance(source, GGUFHeader):
            state.update(read_gguf_state(source, names, blocks, device, dtype))
            continue
        ordinary = {n: k for n, k in names.items() if source.tensors[k].dtype not in FP8_DTYPES}
        narrow_keys = frozenset(ordinary[n] for n in kept if n in ordinary)
        read = read_safetensors(source, list(ordinary.values()), device, dtype, narrow_keys)
        state.update({n: read[k] for n, k in ordinary.items()})
        fp8 = {n: k for n, k in names.items() if n not in ordinary}
        if fp8:
            with open_tensors(source.path) as mapped:
                for n, k in fp8.items():
                    t = mapped.get_tensor(k).to(device)
                    state[n] = t if n in kept else t.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise UserError(f"internal error: {name} was not loaded")
    model.requires_grad_(False)
    return model.eval()
