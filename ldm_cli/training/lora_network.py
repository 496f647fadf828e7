"""The LoRA that `ldm train lora` trains: which layers it changes, how it changes them while
training, and the file it writes.

Each changed weight W becomes ``W + alpha / rank * up @ down`` through a
``torch.nn.utils.parametrize`` parametrization, so every forward of the model (the training
step, the preview images through the ordinary pipeline, the fused q/k/v rows of an OpenCLIP
text tower) sees the changed weight, and removing the parametrizations gives W back untouched.
``down`` starts as kohya's (Kaiming-uniform), ``up`` at zero: training starts at the base
model.

Layers, as kohya's sd-scripts choose them:
* ``attention`` (default): every linear and 1x1 convolution of the U-Net's transformer blocks
  (proj_in, to_q/k/v/out, the feed-forward, proj_out);
* ``locon``: those, plus the convolutions and time-embedding layers of the residual blocks and
  the down/up-samplers (LoCon; 3x3 kernels get a 3x3 ``down`` and a 1x1 ``up``);
* with the text encoder on, every linear layer of its attention and MLP (q, k and v of a fused
  OpenCLIP ``in_proj_weight`` are three layers, as transformers names them).

File names are the reader's (:mod:`ldm_cli.networks.keys`) taken backwards: kohya's
``lora_unet_<diffusers path>`` for SD 1.x/2.x, ``lora_unet_<original path>`` for SDXL (as
kohya's SDXL scripts write them), ``lora_te_``/``lora_te1_``/``lora_te2_`` + the transformers
path; or diffusers/PEFT's ``unet.<path>.lora_A.weight`` with ``lora_adapter_metadata``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ldm_cli.core.errors import UserError
from ldm_cli.models.attention import SpatialTransformer
from ldm_cli.models.unet_blocks import Downsample, ResBlock, Upsample
from ldm_cli.networks.keys import LayerTarget, layer_table

MODULE_SETS = ("attention", "locon")
FORMATS = ("kohya", "peft")
_PEFT_ROOTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_TE = ("lora_te_", "lora_te1_", "lora_te2_")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 8.0
    modules: str = "locon"  # the measured default (docs/adapters.md), as the CLI's
    text_encoder: bool = True

    def check(self) -> None:
        if self.rank < 1:
            raise UserError(f"--rank must be at least 1, not {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise UserError(f"--alpha must be a positive number, not {self.alpha}")
        if self.modules not in MODULE_SETS:
            raise UserError(f"--modules must be one of {', '.join(MODULE_SETS)}: {self.modules!r}")


class LoraLayer(nn.Module):
    """``down`` [rank, in, (kh, kw)] and ``up`` [out, rank, (1, 1)] of one changed weight."""

    def __init__(self, target: LayerTarget, weight_shape: torch.Size, rank: int, alpha: float):
        super().__init__()
        self.target = target
        out = weight_shape[0] if target.rows is None else target.rows[1] - target.rows[0]
        kernel = tuple(weight_shape[2:])
        self.rank = min(rank, out, math.prod(weight_shape[1:]))
        self.alpha = alpha
        self.enabled = True  # off: the weight as it is (the teacher of `ldm train lcm`)
        self.down = nn.Parameter(torch.empty(self.rank, weight_shape[1], *kernel))
        self.up = nn.Parameter(torch.zeros(out, self.rank, *(1 for _ in kernel)))
        self.weight_shape = weight_shape

    def reset(self, generator: torch.Generator) -> None:
        with torch.no_grad():  # nn.init.kaiming_uniform_(a=sqrt(5)) with our own generator
            fan_in = self.down[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            self.down.copy_(torch.rand(self.down.shape, generator=generator) * 2 * bound - bound)
            self.up.zero_()

    def delta(self) -> torch.Tensor:
        """alpha / rank * up @ down, shaped like the rows it changes."""
        out = self.up.shape[0]
        change = self.up.reshape(out, self.rank) @ self.down.reshape(self.rank, -1)
        shape = (out, *self.weight_shape[1:])
        return (change * (self.alpha / self.rank)).reshape(shape)


class AddDeltas(nn.Module):
    """A parametrization: the weight plus the deltas of the layers that change it."""

    def __init__(self, layers: list[LoraLayer]):
        super().__init__()
        self.layers = layers  # a plain list: the layers belong to the LoraNetwork

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if not layer.enabled:
                continue
            rows = layer.target.rows
            delta = layer.delta().to(weight.dtype)
            if rows is None:
                weight = weight + delta
            else:
                pad = (0, 0) * (weight.ndim - 1) + (rows[0], weight.shape[0] - rows[1])
                weight = weight + nn.functional.pad(delta, pad)
        return weight


def kohya_names(model: nn.Module) -> dict[LayerTarget, tuple[str, str]]:
    """Every target of the model that has a PEFT name -> (kohya name, PEFT name), from the
    reader's table (a fused OpenCLIP in_proj as a whole has none: it trains as q, k, v)."""
    by_target: dict[LayerTarget, set[str]] = {}
    for name, target in layer_table(model).items():
        by_target.setdefault(target, set()).add(name)
    sdxl = bool(model.config.conditioner)
    out = {}
    for target, names in by_target.items():
        peft = next((n for n in sorted(names) if n.split(".", 1)[0] in _PEFT_ROOTS), None)
        if peft is None:
            continue
        root, path = peft.split(".", 1)
        flat = path.replace(".", "_")
        if root == "unet":
            diffusers = "lora_unet_" + flat
            others = sorted(n for n in names if n.startswith("lora_unet_") and n != diffusers)
            kohya = others[0] if sdxl and others else diffusers
        else:
            kohya = next(p + flat for p in _KOHYA_TE if p + flat in names)
        out[target] = (kohya, peft)
    return out


def _unet_targets(unet: nn.Module, modules: str) -> set[str]:
    """Weight names under the U-Net that the module set trains."""
    chosen = set()
    kinds = (SpatialTransformer,) if modules == "attention" else (SpatialTransformer, ResBlock)
    for path, module in unet.named_modules():
        sampler = modules == "locon" and isinstance(module, Downsample | Upsample)
        if isinstance(module, kinds) or sampler:
            for sub, child in module.named_modules():
                if not isinstance(child, nn.Linear | nn.Conv2d):
                    continue
                wide_kernel = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
                if modules == "locon" or not wide_kernel:
                    chosen.add(f"{path}.{sub}.weight" if sub else f"{path}.weight")
    return chosen


class LoraNetwork(nn.Module):
    """The trainable layers of a LoRA on `model`, registered in a fixed (sorted) order."""

    def __init__(self, model: nn.Module, spec: LoraSpec):
        super().__init__()
        spec.check()
        self.spec = spec
        names = kohya_names(model)
        unet_root = "model.diffusion_model."
        wanted = {unet_root + p for p in _unet_targets(model.model.diffusion_model, spec.modules)}
        params = dict(model.named_parameters())
        self.names: dict[str, tuple[str, str]] = {}
        layers = {}
        for target, (kohya, peft) in sorted(names.items(), key=lambda item: item[1][0]):
            if target.component == "unet" and target.param not in wanted:
                continue
            if target.component == "te" and not spec.text_encoder:
                continue
            key = kohya.replace(".", "_")
            layers[key] = LoraLayer(target, params[target.param].shape, spec.rank, spec.alpha)
            self.names[key] = (kohya, peft)
        if not layers:
            raise UserError("this model has no layers of the chosen kind to train")
        self.layers = nn.ModuleDict(layers)
        self._attached: list[str] = []  # the parameters attach() parametrized

    @property
    def enabled(self) -> bool:
        return all(layer.enabled for layer in self.layers.values())

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for layer in self.layers.values():
            layer.enabled = value

    def reset(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            layer.reset(generator)

    def attach(self, model: nn.Module) -> None:
        """Parametrize every changed weight of `model` (its base weights stay untouched)."""
        by_param: dict[str, list[LoraLayer]] = {}
        for layer in self.layers.values():
            by_param.setdefault(layer.target.param, []).append(layer)
        for param, layers in by_param.items():
            owner, attribute = param.rsplit(".", 1)
            module = model.get_submodule(owner)
            parametrize.register_parametrization(module, attribute, AddDeltas(layers), unsafe=True)
        self._attached = list(by_param)

    def detach_from(self, model: nn.Module) -> None:
        for param in self._attached:
            owner, attribute = param.rsplit(".", 1)
            module = model.get_submodule(owner)
            parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
        self._attached = []

    def drop_unreached(self, model: nn.Module, encode) -> list[str]:
        """Leave out the text-encoder layers whose output the model never uses (the last
        layers of a tower read with clip skip): they would train to nothing, and DDP refuses
        parameters that get no gradient. `encode()` runs the text encoder on a prompt; a
        layer is unreached when its ``up`` gets no gradient from the outputs."""
        for param in self.parameters():
            param.grad = None
        with torch.enable_grad():
            out = encode()
            outputs = out if isinstance(out, tuple) else (out,)
            sum(o.float().sum() for o in outputs).backward()
        gone = [
            key
            for key, layer in self.layers.items()
            if layer.target.component == "te" and layer.up.grad is None
        ]
        for param in self.parameters():
            param.grad = None
        if gone:
            self.detach_from(model)
            for key in gone:
                del self.layers[key]
                del self.names[key]
            self.attach(model)
        return gone

    def tensors(self, layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The file's tensors: kohya (``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``)
        or PEFT (``.lora_A.weight``, ``.lora_B.weight``; alpha in the metadata)."""
        out = {}
        for key, layer in self.layers.items():
            kohya, peft = self.names[key]
            down, up = layer.down.detach().to(dtype), layer.up.detach().to(dtype)
            if layout == "kohya":
                out[f"{kohya}.lora_down.weight"] = down
                out[f"{kohya}.lora_up.weight"] = up
                out[f"{kohya}.alpha"] = torch.tensor(float(layer.alpha), dtype=dtype)
            else:
                out[f"{peft}.lora_A.weight"] = down
                out[f"{peft}.lora_B.weight"] = up
        return out

    def peft_metadata(self) -> dict[str, str]:
        """diffusers' ``lora_adapter_metadata``: each component's rank and alpha."""
        config = {}
        components = {self.names[k][1].split(".", 1)[0] for k in self.layers}
        for component in sorted(components):
            config[f"{component}.r"] = self.spec.rank
            config[f"{component}.lora_alpha"] = self.spec.alpha
        return {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}
