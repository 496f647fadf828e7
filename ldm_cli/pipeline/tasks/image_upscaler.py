"""Feed-forward image upscalers: the embedded super-resolution networks and the files people
have for this job (ESRGAN, RealESRGAN, 4x-UltraSharp, SwinIR, DAT, HAT, ...).

Files are read here: safetensors directly, pickles (`.pth`) only with `--allow-pickle` and
through torch's weights-only unpickler, so no code in a file runs. Real-ESRGAN's compact layout
(the embedded `ldm-sr` networks among them) is built by `ldm_cli.models.sr_compact`; every
other architecture is detected and built by spandrel, the library ComfyUI and chaiNNer use, and
a tile's pixels are what spandrel's model gives for it.

An image is upscaled in overlapping tiles (`ldm_cli.core.tiling`: feathered blending), so memory
depends on the tile size only. A scale the network does not have is reached as A1111 does:
passes of the network until the image is at least that large, then one Lanczos resize to the
exact size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm_cli.core.errors import UserError
from ldm_cli.core.tiling import Blender, Tile, tile_grid
from ldm_cli.models.sr_compact import SRVGGCompact, compact_shape

EMBEDDED_NAME = "ldm-sr"
DEFAULT_TILE_SIZE = 256  # input pixels: a 256 tile of the x4 network is ~100 MB of activations
DEFAULT_OVERLAP = 32  # wider than the compact network's receptive radius (18 px)
METADATA_KEY = "ldm_sr"  # training settings and held-out metrics in the embedded files
COMPACT_NAME = "RealESRGAN Compact"  # spandrel's name for the layout

Progress = Callable[[int, int], None]


@dataclass
class ImageUpscaler:
    """A loaded upscaler: `model` maps [B, 3, h, w] in [0, 1] to [B, 3, h * scale, w * scale];
    `name` is what PNGs record."""

    model: Callable[[torch.Tensor], torch.Tensor]
    module: torch.nn.Module
    scale: int
    name: str
    path: Path | None = None
    supports_half: bool = True
    architecture: str = COMPACT_NAME

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device: str | torch.device, half: bool = False) -> ImageUpscaler:
        dtype = torch.float16 if half and self.supports_half else torch.float32
        self.module.to(device=device, dtype=dtype)
        return self

    @torch.inference_mode()
    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        """One tile through the model: float32 on the CPU, clamped to [0, 1]."""
        out = self.model(pixels.to(self.device, self.dtype))
        return out.float().clamp(0, 1).cpu()

    def upscale_once(
        self,
        image: Image.Image,
        tile_size: int = DEFAULT_TILE_SIZE,
        overlap: int = DEFAULT_OVERLAP,
        progress: Progress | None = None,
        done: int = 0,
        total: int | None = None,
    ) -> Image.Image:
        """One pass of the model over `image`, tile by tile."""
        pixels = to_tensor(image)
        width, height = image.size
        tiles = tile_grid(width, height, tile_size, overlap)
        blender = Blender(3, width, height, self.scale, overlap)
        for k, tile in enumerate(tiles):
            blender.add(tile, self.run(crop(pixels, tile))[0])
            if progress is not None:
                progress(done + k + 1, total or len(tiles))
        return to_image(blender.result())

    def upscale(
        self,
        image,
        scale: float | None = None,
        tile_size: int = DEFAULT_TILE_SIZE,
        overlap: int = DEFAULT_OVERLAP,
        progress: Progress | None = None,
    ) -> Image.Image:
        """`image` (a path or PIL image, any mode) at `scale` times its size (default: the
        network's own), in tiles of `tile_size` input pixels overlapping by `overlap` (0: the
        whole image at once)."""
        from ldm_cli.core.image_inputs import load_image

        return upscale_image(self, load_image(image), scale, tile_size, overlap, progress)


def compact_upscaler(module: SRVGGCompact, name: str, path: Path | None = None) -> ImageUpscaler:
    module.eval().requires_grad_(False)
    return ImageUpscaler(module, module, module.upscale, name, path)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [0, 1]."""
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return array.view(image.height, image.width, 3).permute(2, 0, 1)[None].float() / 255


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB PIL image, rounded to the nearest level (`pixels` is used up:
    scaled in place, which keeps a 4096 x 4096 result from taking three float copies)."""
    with torch.inference_mode():  # in place is allowed on inference tensors only in this mode
        levels = pixels.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return Image.fromarray(levels.permute(1, 2, 0).contiguous().numpy())


def crop(pixels: torch.Tensor, tile: Tile) -> torch.Tensor:
    left, top, right, bottom = tile.box
    return pixels[..., top:bottom, left:right]


def check_tile_options(tile_size: int, overlap: int) -> None:
    if tile_size and tile_size < 16:
        raise UserError(f"--tile-size must be 0 (no tiling) or at least 16, got {tile_size}")
    if tile_size and not 0 <= overlap < tile_size / 2:
        raise UserError(
            f"--tile-overlap must be at least 0 and less than half the tile size ({tile_size})"
        )


def passes_for(scale: float, network_scale: int) -> int:
    """How many passes of an x`network_scale` network reach at least `scale`."""
    if network_scale <= 1:
        return 1
    count, reached = 1, network_scale
    while reached < scale - 1e-9:
        count += 1
        reached *= network_scale
    return count


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def upscale_image(
    upscaler: ImageUpscaler,
    image: Image.Image,
    scale: float | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    progress: Progress | None = None,
) -> Image.Image:
    """`image` at `scale` times its size (default: the network's own scale)."""
    scale = float(scale or upscaler.scale)
    return upscale_to(
        upscaler, image, target_size(*image.size, scale), tile_size, overlap, progress
    )


def upscale_to(
    upscaler: ImageUpscaler,
    image: Image.Image,
    size: tuple[int, int],
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    progress: Progress | None = None,
) -> Image.Image:
    """`image` (made RGB) at exactly `size`: passes of the network until it is at least that
    large, then a Lanczos resize where the size is not reached exactly."""
    check_tile_options(tile_size, overlap)
    needed = max(size[0] / image.width, size[1] / image.height)
    counts, (w, h) = [], image.size
    for _ in range(passes_for(needed, upscaler.scale)):  # one progress bar over every pass
        counts.append(len(tile_grid(w, h, tile_size, overlap)))
        w, h = w * upscaler.scale, h * upscaler.scale
    out, done = image.convert("RGB"), 0
    for count in counts:
        out = upscaler.upscale_once(out, tile_size, overlap, progress, done, sum(counts))
        done += count
    if out.size != tuple(size):
        out = out.resize(size, Image.Resampling.LANCZOS)
    return out


def parameters_text(
    upscaler: ImageUpscaler, scale: float, source: tuple[int, int], tile_size: int, overlap: int
) -> str:
    """A1111's extras keys for an upscale, with the tiling that made it."""
    from ldm_cli.core.pngmeta import format_number

    fields = {
        "Postprocess upscale by": format_number(scale),
        "Postprocess upscaler": upscaler.name,
        "Source size": f"{source[0]}x{source[1]}",
    }
    if tile_size and max(source) > tile_size:
        fields.update({"Tile size": str(tile_size), "Tile overlap": str(overlap)})
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def read_state_dict(path: Path) -> dict:
    """The file's tensors: safetensors read directly; a pickle only with --allow-pickle
    (weights-only unpickling)."""
    from ldm_cli.checkpoints.pickled import load_weights_only, looks_pickled

    if not path.exists():
        raise UserError(f"upscaler file not found: {path}")
    if path.is_dir():
        raise UserError(f"upscaler path is a directory, expected a model file: {path}")
    if looks_pickled(path):
        state = load_weights_only(path)
        if not isinstance(state, dict):
            raise UserError(f"{path.name} holds a {type(state).__name__}, not a state dict")
        return state
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path.name} is not a readable .safetensors file ({e})") from None


def load_upscaler(path: str | Path, device: str | torch.device = "cpu") -> ImageUpscaler:
    """An upscaler model file on `device`, in eval mode: the compact layout (the embedded
    networks, realesr-general, realesr-animevideo) built here, any other architecture by
    spandrel."""
    path = Path(path)
    state = read_state_dict(path)
    shape = compact_shape(state)
    if shape is None:
        return _spandrel_upscaler(path, state, device)
    module = SRVGGCompact(shape)
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path.name}: its tensors do not make a whole model ({e})") from None
    return compact_upscaler(module.to(device), upscaler_name(path), path)


def _spandrel_upscaler(path: Path, state: dict, device) -> ImageUpscaler:
    import spandrel

    state = spandrel.canonicalize_state_dict(state)
    try:
        descriptor = spandrel.ModelLoader(device).load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UserError(
            f"{path.name} is not an upscaler spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, "
            "DAT, HAT, OmniSR, SPAN, ...)"
        ) from None
    except (KeyError, RuntimeError, ValueError, AssertionError) as e:
        raise UserError(f"{path.name}: its tensors do not make a whole model ({e})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UserError(f"{path.name} is an inpainting model, not an upscaler")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UserError(
            f"{path.name} is not an RGB model ({descriptor.input_channels} channels in, "
            f"{descriptor.output_channels} out)"
        )
    if descriptor.scale < 2:
        raise UserError(f"{path.name} restores images at their size; it does not enlarge them")
    descriptor.eval()
    return ImageUpscaler(
        descriptor,  # its call pads to the model's size requirements and crops back
        descriptor.model,
        int(descriptor.scale),
        upscaler_name(path),
        path,
        supports_half=bool(descriptor.supports_half),
        architecture=descriptor.architecture.name,
    )


def upscaler_name(path: Path) -> str:
    """The name PNGs record for a file: its stem, as A1111 names models by their files."""
    return path.stem


def load_embedded_upscaler(scale: float, device: str | torch.device = "cpu") -> ImageUpscaler:
    """The embedded network for `scale`: x2 up to 2, x4 above."""
    from ldm_cli.core.embedded import embedded_sr_path

    upscaler = load_upscaler(embedded_sr_path(2 if scale <= 2 else 4), device)
    upscaler.name = EMBEDDED_NAME
    return upscaler


def file_metadata(path: Path) -> dict:
    """The embedded files' training record (empty for other files)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    except Exception:
        return {}
