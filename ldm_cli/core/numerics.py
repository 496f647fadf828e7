"""NaN/inf checks between the stages, and the fp32 retry of an fp16 VAE decode.

fp16 tops out at 65504. A U-Net that overflows leaves inf/NaN in the latents: that is reported
(there is nothing to retry short of the whole run in fp32). A VAE decoder that overflows, a
known failure of SD VAEs in half precision, is converted to fp32 for the rest of the run and
the batch decoded again, with a warning: what AUTOMATIC1111 users know as --no-half-vae.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ldm_cli.core.errors import UserError

LATENTS_MESSAGE = "the sampled latents hold NaN/inf values (numerical overflow in the U-Net){hint}"
IMAGE_MESSAGE = "the decoded image holds NaN/inf values (numerical overflow in the VAE{how})"
RETRY_WARNING = (
    "warning: the {dtype} VAE decoder overflowed (NaN/inf in the image); decoding in fp32 "
    "from now on (AUTOMATIC1111's --no-half-vae)"
)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(
        dtype, str(dtype)
    )


def check_latents(latents: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """One-line UserError when the sampler's latents are not all finite."""
    if bool(torch.isfinite(latents).all()):
        return
    hint = "; try --dtype fp32" if dtype in (torch.float16, torch.bfloat16) else ""
    raise UserError(LATENTS_MESSAGE.format(hint=hint), exit_code=1)


@torch.inference_mode()
def decode_finite(
    vae: torch.nn.Module,
    latents: torch.Tensor,
    scale_factor: float,
    model_dtype: torch.dtype | None = None,
    warn: Callable[[str], None] = _warn,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shift_factor: float = 0.0,
) -> torch.Tensor:
    """`vae.decode(latents / scale_factor + shift_factor)` as float32, checked to be finite.

    Non-finite latents are refused before decoding. A half-precision decoder whose output is
    not finite is converted to fp32 in place (it stays so) and the batch decoded again.
    `decode` replaces `vae.decode` (the tiled decoder of ldm_cli.pipeline.vae_codec).
    """
    check_latents(latents, model_dtype)
    decode = decode or vae.decode
    dtype = next(vae.parameters()).dtype
    images = decode(latents.to(dtype) / scale_factor + shift_factor).float()
    if bool(torch.isfinite(images).all()):
        return images
    if dtype in (torch.float16, torch.bfloat16):
        warn(RETRY_WARNING.format(dtype=_dtype_name(dtype)))
        with torch.inference_mode(False):  # the fp32 weights stay ordinary tensors
            vae.float()
        images = decode(latents.float() / scale_factor + shift_factor).float()
        if bool(torch.isfinite(images).all()):
            return images
        raise UserError(IMAGE_MESSAGE.format(how=", in fp32 too"), exit_code=1)
    raise UserError(IMAGE_MESSAGE.format(how=""), exit_code=1)
