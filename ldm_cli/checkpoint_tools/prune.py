"""`ldm convert --prune`: which tensors a pruned checkpoint keeps, and `--ema`.

A training checkpoint (the original SD releases' "full" files, a Lightning `.ckpt`) carries
the U-Net twice: the trained weights (`model.diffusion_model.*`) and their exponential moving
average (`model_ema.*`, every dot of the name removed: `model_ema.diffusion_modelout0weight`).
A1111, ComfyUI, diffusers' `from_single_file` and ldm all load the trained weights and ignore
the EMA, so `--prune` drops `model_ema.*` and the image does not change. The field's
"-emaonly" files (`v1-5-pruned-emaonly`) were made the other way: `--ema` puts the EMA weights
in place of the trained ones (then drops `model_ema.*`), which does change the image.

Also dropped by `--prune`: tensors only training uses, the loss's (`loss.*`, e.g. a VAE
checkpoint's discriminator and LPIPS, at any depth) and the loss weights `logvar` and
`lvlb_weights`. Kept: every tensor a model is built from, the noise schedule buffers
(`betas`, `alphas_cumprod`, ...: small, and some tools read a model's schedule from them), the
`v_pred`/`ztsnr` markers, and CLIP's `position_ids` buffer (ldm skips it; older transformers
and A1111 load it). Optimizer states, learning-rate schedulers and other non-tensor entries of
a pickle are never kept: only its state dict of tensors is read.
"""

from __future__ import annotations

import re

from ldm_cli.core.errors import UserError

EMA_PREFIX = "model_ema."
TRAINING_ONLY = re.compile(r"^(model_ema\..*|(.*\.)?loss\..*|logvar|lvlb_weights)$")
_EMA_ONLY = re.compile(r"^model_ema\..*$")  # --ema alone: the EMA copy goes, nothing else
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


def kept_keys(keys, prune: bool, ema: bool, name: str) -> dict[str, str]:
    """Output key -> the source key it is read from, in the source's order."""
    keys = list(keys)
    if not prune and not ema:
        return {k: k for k in keys}
    dropped = TRAINING_ONLY if prune else _EMA_ONLY
    sources = {k: k for k in keys if not dropped.match(k)}
    if ema:
        sources.update(_ema_sources(keys, name))
    return sources


def ema_key(key: str) -> str | None:
    """The EMA copy's name of a U-Net weight (LitEma removes the dots), None for others."""
    if not key.startswith("model."):
        return None
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def _ema_sources(keys: list[str], name: str) -> dict[str, str]:
    present = set(keys)
    averaged = [k for k in present if k.startswith(EMA_PREFIX) and k not in _EMA_BOOKKEEPING]
    if not averaged:
        raise UserError(f"--ema: {name} holds no EMA weights (no model_ema.* tensors)")
    wanted = {k: ema_key(k) for k in keys if ema_key(k) is not None}
    missing = sorted(k for k, e in wanted.items() if e not in present)
    if missing:
        raise UserError(
            f"--ema: {name} has no EMA copy of {missing[0]} (expected {wanted[missing[0]]}; "
            f"{len(missing)} missing)"
        )
    return wanted
