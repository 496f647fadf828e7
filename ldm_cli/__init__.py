"""ldm: text-to-image latent diffusion from the terminal.

import ldm_cli
pipe = ldm_cli.load("v1-5-pruned-emaonly.safetensors")   # or load() for the embedded model
images = pipe.generate("a red circle on a blue background", seed=1)
"""

from ldm_cli.core.errors import UserError

__version__ = "0.1.0"
__all__ = ["load", "load_upscaler", "HiresFix", "Control", "UserError", "__version__"]


def load(
    path=None,
    device=None,
    dtype=None,
    *,
    prediction=None,
    clip_skip=None,
    compile=False,
    offload="none",
    vae_tiling="auto",
    low_memory=None,
    cuda_graphs=False,
    vae=None,
    clip_l=None,
    clip_g=None,
    t5=None,
):
    """Open a single-file `.safetensors` checkpoint as a `Pipeline` (see ldm_cli.pipeline.base).

    `prediction` ("eps" or "v") and `clip_skip` (1 = last text layer) override the defaults;
    `compile=True` runs the U-Net through torch.compile, `offload="model"` or `"sequential"`
    keeps the weights in CPU memory on a CUDA device (see ldm_cli.pipeline.load);
    `vae_tiling` ("auto", "on", "off") decodes and encodes large images in tiles
    (ldm_cli.pipeline.vae_codec); `low_memory` keeps an fp16 file's large U-Net weights in 16
    bits on the CPU, widened per call (ldm_cli.ops.narrow_weights): by default unless `compile` or
    `offload`; False converts them at load. `cuda_graphs=True` (CUDA) compiles the U-Net to
    replay each step as CUDA graphs (ldm_cli.runtime.compile). A FLUX.1 or SD3/3.5 file
    (safetensors or GGUF) opens as a flow-model pipeline; `vae`, `clip_l`, `clip_g` and `t5`
    name the files of the parts it does not hold (FLUX's ae.safetensors, clip_l.safetensors,
    t5xxl_fp16.safetensors) or replace its own.
    """
    from ldm_cli.pipeline.load import load as _load

    return _load(
        path, device=device, dtype=dtype, prediction=prediction, clip_skip=clip_skip,
        compile=compile, offload=offload, vae_tiling=vae_tiling, low_memory=low_memory,
        cuda_graphs=cuda_graphs, vae=vae, clip_l=clip_l, clip_g=clip_g, t5=t5,
    )  # fmt: skip


def load_upscaler(path=None, *, scale=4, device=None):
    """An image upscaler (`ldm_cli.pipeline.tasks.image_upscaler.ImageUpscaler`): `path` an
    upscaler file (ESRGAN, RealESRGAN, SwinIR, DAT, ... as .safetensors, or a .pth inside
    `ldm_cli.checkpoints.pickled.allow_pickle()`), or None for the embedded ldm-sr network for
    `scale` (x2 up to 2, x4 above). `device`: "auto" (None), "cpu", "cuda", ...

    ldm_cli.load_upscaler().upscale("photo.png").save("photo-x4.png")
    """
    from ldm_cli.core.devices import resolve_device
    from ldm_cli.pipeline.tasks.image_upscaler import load_embedded_upscaler
    from ldm_cli.pipeline.tasks.image_upscaler import load_upscaler as _load_upscaler

    where = resolve_device(device)
    if path is None:
        return load_embedded_upscaler(scale, where)
    return _load_upscaler(path, where)


def __getattr__(name: str):
    """`ldm_cli.HiresFix` (the settings of `generate(..., hires=)`) and `ldm_cli.Control` (one
    ControlNet of `generate(..., control=)`: ldm_cli.control.units.ControlSpec), imported on
    first use so that `import ldm_cli` stays free of torch."""
    if name == "HiresFix":
        from ldm_cli.pipeline.tasks.hires import HiresFix

        return HiresFix
    if name == "Control":
        from ldm_cli.control.units import ControlSpec

        return ControlSpec
    raise AttributeError(f"module 'ldm_cli' has no attribute {name!r}")
