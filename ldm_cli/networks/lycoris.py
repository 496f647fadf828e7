"""The weight change of each kind of layer a LoRA file holds, computed as AUTOMATIC1111 does
(``extensions-builtin/Lora``: network_lora.py, network_hada.py, network_lokr.py and the DoRA
of network.py), which is also what LyCORIS and PEFT's LoHa/LoKr/DoRA layers compute.

* LoRA / LoCon (``lora_down``, ``lora_up``): ``up @ down``, both flattened to matrices; with
  LyCORIS' Tucker middle ``lora_mid`` [r, r, kh, kw] (its LoCon "cp" form, ``down`` and ``up``
  then 1x1): ``einsum("n m k l, i n, m j -> i j k l", mid, up, down)``. Scale alpha / r, r the
  rows of ``down``.
* LoHa (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``): the elementwise product
  ``(w1_a @ w1_b) * (w2_a @ w2_b)``. A factor with a Tucker core ``hada_t1``/``hada_t2``
  [r, r, kh, kw] (convolutions; ``w_a`` is then [r, out], ``w_b`` [r, in]) is
  ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)``. Scale alpha / r, r the rows of
  ``hada_w1_b``.
* LoKr (``lokr_w1`` or ``lokr_w1_a`` @ ``lokr_w1_b``; ``lokr_w2``, ``lokr_w2_a`` @
  ``lokr_w2_b``, or that pair with the Tucker core ``lokr_t2``): the Kronecker product
  ``kron(w1, w2)`` (w1 given 1x1 kernel dimensions when w2 has a kernel). Scale alpha / r only
  where a factor is split in two, r the rows of ``lokr_w2_b`` (else of ``lokr_w1_b``); 1 when
  both are whole, as in A1111 and LyCORIS.

Without an ``alpha`` the scale is 1. DoRA (a ``dora_scale`` beside any of these) is
:func:`decomposed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm_cli.core.errors import UserError

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _f32(tensor: torch.Tensor, device) -> torch.Tensor:
    return tensor.to(device, torch.float32)


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def _dims(shape) -> str:
    return "x".join(map(str, shape))


@dataclass(frozen=True)
class LowRank:
    """LoRA / LoCon: ``up`` [out, r(, 1, 1)] @ ``down`` [r, in(, kh, kw)], or with a Tucker
    ``mid`` [r, r, kh, kw] between them."""

    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None
    scale: float

    def check(self, where: str) -> None:
        up, down = self.up, self.down
        fits = up.ndim in (2, 4) and down.ndim in (2, 4) and up[0, 0].numel() == 1
        if self.mid is None:
            fits = fits and down.shape[0] == up.shape[1]
        else:
            fits = fits and down[0, 0].numel() == 1 and self.mid.ndim == 4
            fits = fits and tuple(self.mid.shape[:2]) == (up.shape[1], down.shape[0])
        if not fits:
            mid = "" if self.mid is None else f", mid {tuple(self.mid.shape)}"
            raise UserError(
                f"{where} has a down {tuple(self.down.shape)}{mid} and up {tuple(self.up.shape)} "
                "that do not make a LoRA"
            )

    def updown(self, device=None) -> torch.Tensor:
        up, down = _matrix(_f32(self.up, device)), _matrix(_f32(self.down, device))
        if self.mid is None:
            return (up @ down).reshape(up.shape[0], *self.down.shape[1:]) * self.scale
        mid = _f32(self.mid, device)
        return torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down) * self.scale


@dataclass(frozen=True)
class Factor:
    """A matrix (or kernel) of LoHa or LoKr: stored whole, as ``a @ b``, or as ``a`` and ``b``
    [r, out] and [r, in] around a Tucker ``core`` [r, r, kh, kw]."""

    name: str  # hada_w1, lokr_w2, ...: what error messages call it
    whole: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    core: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.whole is not None:
            return tuple(self.whole.shape)
        if self.core is not None:
            return (self.a.shape[1], self.b.shape[1], *self.core.shape[2:])
        return (self.a.shape[0], _matrix(self.b).shape[1])

    @property
    def rank(self) -> int | None:
        return None if self.b is None else self.b.shape[0]

    def check(self, where: str) -> None:
        if self.whole is not None:
            return
        a, b = self.a.shape, self.b.shape
        if self.core is None:
            fits = len(a) == 2 and a[1] == b[0]
            core = ""
        else:
            core = f", {self.name.replace('_w', '_t')} {tuple(self.core.shape)}"
            fits = len(a) == len(b) == 2 and self.core.ndim == 4
            fits = fits and tuple(self.core.shape[:2]) == (a[0], b[0])
        if not fits:
            raise UserError(
                f"{where} has a {self.name}_a {tuple(a)}, {self.name}_b {tuple(b)}{core} that "
                "do not fit together"
            )

    def build(self, device=None) -> torch.Tensor:
        if self.whole is not None:
            return _f32(self.whole, device)
        a, b = _f32(self.a, device), _f32(self.b, device)
        if self.core is None:
            return _matrix(a) @ _matrix(b)
        core = _f32(self.core, device)
        return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)


@dataclass(frozen=True)
class LoHa:
    """LyCORIS LoHa: the elementwise product of two low-rank factors, times `scale`."""

    w1: Factor
    w2: Factor
    scale: float

    def check(self, where: str) -> None:
        self.w1.check(where)
        self.w2.check(where)
        one, two = self.w1.shape, self.w2.shape
        if one[0] != two[0] or torch.Size(one).numel() != torch.Size(two).numel():
            raise UserError(
                f"{where} has LoHa factors of {_dims(one)} and {_dims(two)}, which differ"
            )

    def updown(self, device=None) -> torch.Tensor:
        one = self.w1.build(device)
        return one * self.w2.build(device).reshape(one.shape) * self.scale


@dataclass(frozen=True)
class LoKr:
    """LyCORIS LoKr: the Kronecker product of `w1` and `w2`, times `scale`."""

    w1: Factor
    w2: Factor
    scale: float

    def check(self, where: str) -> None:
        self.w1.check(where)
        self.w2.check(where)
        if len(self.w1.shape) != 2 or len(self.w2.shape) not in (2, 4):
            raise UserError(
                f"{where} has LoKr factors of {_dims(self.w1.shape)} and "
                f"{_dims(self.w2.shape)}, which make no weight"
            )

    def updown(self, device=None) -> torch.Tensor:
        one, two = self.w1.build(device), self.w2.build(device)
        if two.ndim == 4:
            one = one[:, :, None, None]
        return torch.kron(one, two.contiguous()) * self.scale


Change = LowRank | LoHa | LoKr


def _alpha_scale(parts: dict[str, torch.Tensor], rank: int | None) -> float:
    alpha = parts.get("alpha")
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def _missing(parts: dict[str, torch.Tensor], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name not in parts), None)


def _factor(parts: dict[str, torch.Tensor], name: str, core: str | None) -> Factor:
    if name in parts:
        return Factor(name, whole=parts[name])
    return Factor(
        name, a=parts[f"{name}_a"], b=parts[f"{name}_b"], core=parts.get(core) if core else None
    )


def loha(parts: dict[str, torch.Tensor], where: str) -> LoHa:
    """The LoHa of a layer's parts; `where` ("LoRA x.safetensors: layer y") names it in errors."""
    missing = _missing(parts, LOHA_PARTS[:4])
    if missing:
        raise UserError(f"{where} is a LyCORIS LoHa layer with no {missing}")
    w1, w2 = _factor(parts, "hada_w1", "hada_t1"), _factor(parts, "hada_w2", "hada_t2")
    change = LoHa(w1, w2, _alpha_scale(parts, w1.rank))
    change.check(where)
    return change


def lokr(parts: dict[str, torch.Tensor], where: str) -> LoKr:
    """The LoKr of a layer's parts; `where` names the layer and its file in errors."""
    for name in ("lokr_w1", "lokr_w2"):
        if name not in parts:
            missing = _missing(parts, (f"{name}_a", f"{name}_b"))
            if missing:
                raise UserError(f"{where} is a LyCORIS LoKr layer with no {name} or {missing}")
    w1, w2 = _factor(parts, "lokr_w1", None), _factor(parts, "lokr_w2", "lokr_t2")
    rank = w2.rank if w2.rank is not None else w1.rank
    change = LoKr(w1, w2, _alpha_scale(parts, rank))
    change.check(where)
    return change


def decomposed(weight: torch.Tensor, updown: torch.Tensor, magnitude: torch.Tensor, where: str):
    """DoRA: the change that makes `weight` ``magnitude * (weight + updown) / ||weight +
    updown||`` (float32, on the weight's device).

    The norm is per input channel (over the outputs and the kernel) where ``dora_scale`` is
    [1, in(, 1, 1)] (LyCORIS' default and the only form A1111 reads), per output channel where
    it is [out, 1(, 1, 1)] (LyCORIS' ``wd_on_out``, PEFT's DoRA; A1111 would broadcast that into
    a wrong [out, in] scale). As in A1111 no epsilon is added to the norm.
    """
    merged = weight.float() + updown
    out, inputs = merged.shape[0], merged.shape[1]
    kernel = [1] * (merged.ndim - 2)
    scale = magnitude.to(merged.device, torch.float32)
    if scale.ndim and scale.shape[0] == 1 and scale.numel() == inputs:
        norm = merged.transpose(0, 1).reshape(inputs, -1).norm(dim=1)
        shape = [1, inputs, *kernel]
    elif scale.ndim and scale.shape[0] == out and scale.numel() == out:
        norm = merged.reshape(out, -1).norm(dim=1)
        shape = [out, 1, *kernel]
    else:
        raise UserError(
            f"{where} has a dora_scale {tuple(magnitude.shape)} that fits neither the "
            f"{inputs} inputs nor the {out} outputs of its {_dims(merged.shape)} weight"
        )
    return merged * (scale.reshape(shape) / norm.reshape(shape)) - weight.float()
