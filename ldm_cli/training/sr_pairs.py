"""Training pairs for the super-resolution network: a crop of a source image and the
low-resolution copy a user would have of it.

Half the pairs are the plain case, a bicubic shrink (PIL, antialiased, as `ldm upscale` users
and the held-out evaluation make them). The other half meet what real inputs went through, each
drawn independently: another resampling filter, a Gaussian blur before the shrink, a little
noise after it, JPEG compression last. Every draw comes from the generator passed in, so a
step's batch is the same in every run (training resumes exactly).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

# Extra low-res pixels cut around each crop and dropped after the shrink, so the filter sees
# real neighbours at the crop's edges instead of clamped ones.
MARGIN = 2
CLEAN_FRACTION = 0.5
FILTERS = (
    (Image.Resampling.BICUBIC, 0.55),
    (Image.Resampling.LANCZOS, 0.15),
    (Image.Resampling.BILINEAR, 0.1),
    (Image.Resampling.BOX, 0.1),
    (Image.Resampling.HAMMING, 0.1),
)
BLUR_P, BLUR_SIGMA = 0.25, (0.3, 1.2)  # sigma in low-res pixels
NOISE_P, NOISE_SIGMA = 0.2, (1.0, 6.0)  # in 8-bit levels
JPEG_P, JPEG_QUALITY = 0.25, (55, 95)
# How often each kind of source is drawn (see sr_sources).
KIND_WEIGHTS = {"photos": 0.5, "shapes": 0.15, "textures": 0.2, "text": 0.15}


@dataclass
class SourcePool:
    """Source images by kind, uint8 RGB [H, W, 3], each at least `min_side` on both sides."""

    kinds: dict[str, list[np.ndarray]]

    def pick(self, rng: np.random.Generator) -> np.ndarray:
        names = [k for k in KIND_WEIGHTS if self.kinds.get(k)]
        weights = np.array([KIND_WEIGHTS[k] for k in names])
        kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        images = self.kinds[kind]
        return images[int(rng.integers(len(images)))]

    def sizes(self) -> dict[str, int]:
        return {kind: len(images) for kind, images in self.kinds.items()}


def mosaic(images: list[np.ndarray], min_side: int) -> list[np.ndarray]:
    """Images smaller than `min_side` laid out k x k (k as small as reaches it), in order,
    each mosaic from images of one size."""
    out: list[np.ndarray] = []
    pending: dict[tuple[int, ...], list[np.ndarray]] = {}
    for image in images:
        side = min(image.shape[:2])
        if side >= min_side:
            out.append(image)
            continue
        group = pending.setdefault(image.shape, [])
        group.append(image)
        k = -(-min_side // side)
        if len(group) == k * k:
            rows = [np.concatenate(group[r * k : (r + 1) * k], axis=1) for r in range(k)]
            out.append(np.concatenate(rows, axis=0))
            group.clear()
    return out


def _augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[..., rng.permutation(3)]
    return np.ascontiguousarray(patch)


def _crop(image: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    return image[top : top + side, left : left + side]


def _filter(rng: np.random.Generator) -> Image.Resampling:
    weights = np.array([w for _, w in FILTERS])
    return FILTERS[int(rng.choice(len(FILTERS), p=weights / weights.sum()))][0]


def degrade(high: np.ndarray, scale: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [S, S, 3] -> uint8 [S / scale, S / scale, 3]."""
    image = Image.fromarray(high)
    low_side = high.shape[0] // scale
    if rng.random() < CLEAN_FRACTION:
        return np.asarray(image.resize((low_side, low_side), Image.Resampling.BICUBIC))
    if rng.random() < BLUR_P:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_SIGMA) * scale))
    image = image.resize((low_side, low_side), _filter(rng))
    low = np.asarray(image)
    if rng.random() < NOISE_P:
        sigma = rng.uniform(*NOISE_SIGMA)
        shape = low.shape if rng.random() < 0.5 else (*low.shape[:2], 1)
        noisy = low.astype(np.float64) + rng.normal(0, sigma, shape)
        low = np.clip(noisy, 0, 255).round().astype(np.uint8)
    if rng.random() < JPEG_P:
        buffer = io.BytesIO()
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        Image.fromarray(low).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        low = np.asarray(Image.open(buffer).convert("RGB"))
    return low


def sample_pair(
    pool: SourcePool, scale: int, low_side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(low [low_side, low_side, 3], high [low_side * scale, ...]) uint8."""
    padded = (low_side + 2 * MARGIN) * scale
    high = _augment(_crop(pool.pick(rng), padded, rng), rng)
    low = degrade(high, scale, rng)
    inner = MARGIN * scale
    return (
        low[MARGIN : MARGIN + low_side, MARGIN : MARGIN + low_side],
        high[inner : inner + low_side * scale, inner : inner + low_side * scale],
    )


def sample_batch(
    pool: SourcePool, scale: int, low_side: int, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [B, 3, h, w] in [0, 1]: low-res inputs and high-res targets."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    pairs = [sample_pair(pool, scale, low_side, rng) for _ in range(batch)]
    low = np.stack([p[0] for p in pairs])
    high = np.stack([p[1] for p in pairs])

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255

    return tensor(low), tensor(high)
