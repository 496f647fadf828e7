"""SDXL generation: the ADM (micro-conditioning) vector and a Pipeline whose conditioning
carries it.

The SDXL U-Net takes, besides the text context, a vector ``y`` through ``label_emb``: the
pooled bigG text embedding followed by sinusoidal embeddings (256 wide each, SGM's
``ConcatTimestepEmbedderND``) of six numbers for the base,

    original size (h, w), crop top-left (top, left), target size (h, w),

and of five for the refiner: original size (h, w), crop top-left (top, left), aesthetic score.
These are diffusers' ``add_time_ids`` (``_get_add_time_ids``: original_size +
crops_coords_top_left + target_size, sizes as (height, width)) and ``add_text_embeds``; the
defaults are diffusers' too: original size = target size = the image size, crop (0, 0), the
negative side built the same way (for the refiner with aesthetic score 6 for the prompt and
2.5 for the negative prompt). An empty negative prompt is encoded like any prompt, as
AUTOMATIC1111, ComfyUI and diffusers (given ``negative_prompt=""``) do.

Conditioning rows carry the ADM vector ``y`` after every token's features
(:mod:`ldm_cli.pipeline.tasks.sdxl_packed_rows`), so guidance, img2img and prompt batching move
it unchanged.

**Prompts.** SDXL prompts take the whole A1111 syntax through
:mod:`ldm_cli.pipeline.conditioning`: emphasis, prompt editing and alternation, ``AND``,
``BREAK``, textual-inversion embeddings and long prompts. As in A1111, every 77-token chunk
goes through both towers (features concatenated), the chunks are concatenated along the
sequence (a 150-token prompt gives 154 positions), emphasis and its mean restore apply to the
text features only, and ``y`` takes the pooled output of the *first* chunk of the text that
the schedule entry uses (the negative prompt's its own). A prompt of at most 75 tokens without
syntax gives exactly the rows of :meth:`SDXLPipeline.packed_conditioning`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldm_cli.checkpoints.detect.sdxl import BASE_ADM_NUMBERS, REFINER_ADM_NUMBERS
from ldm_cli.core.config import ModelConfig
from ldm_cli.models.unet_blocks import timestep_embedding
from ldm_cli.pipeline.base import Pipeline
from ldm_cli.pipeline.request import Request
from ldm_cli.pipeline.tasks.sdxl_packed_rows import PackedConditioningUNet, merge_rows, pack
from ldm_cli.text.batch import ScheduledFeatures

if TYPE_CHECKING:
    from ldm_cli.models.latent_diffusion import LatentDiffusion
    from ldm_cli.models.sdxl_conditioner import Conditioner
    from ldm_cli.pipeline.tasks.handover import Refiner

CROP_TOP_LEFT = (0, 0)
AESTHETIC_SCORE = 6.0  # diffusers' StableDiffusionXLImg2ImgPipeline defaults
NEGATIVE_AESTHETIC_SCORE = 2.5


def is_refiner(cfg: ModelConfig) -> bool:
    """An SGM-layout model with one (bigG) text tower: the SDXL refiner."""
    return cfg.conditioner and cfg.text2 is None


def pooled_dim(cfg: ModelConfig) -> int:
    tower = cfg.text_encoders[-1]
    return tower.projection_dim or tower.hidden_size


def adm_embed_dim(cfg: ModelConfig) -> int:
    """Width of each number's sinusoidal embedding in the ADM vector (256 for the real models)."""
    numbers = REFINER_ADM_NUMBERS if is_refiner(cfg) else BASE_ADM_NUMBERS
    assert cfg.unet.adm_in_channels is not None
    extra = cfg.unet.adm_in_channels - pooled_dim(cfg)
    if extra <= 0 or extra % numbers:
        raise ValueError(f"ADM width {cfg.unet.adm_in_channels} does not fit {numbers} numbers")
    return extra // numbers


def base_time_ids(
    width: int,
    height: int,
    *,
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = CROP_TOP_LEFT,
    target_size: tuple[int, int] | None = None,
) -> tuple[float, ...]:
    """diffusers' ``add_time_ids`` of the base: original_size + crops_coords_top_left +
    target_size, each size (height, width), both defaulting to the image's."""
    original = original_size or (height, width)
    target = target_size or (height, width)
    return tuple(float(v) for v in (*original, *crop_top_left, *target))


def refiner_time_ids(
    width: int,
    height: int,
    aesthetic_score: float,
    *,
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = CROP_TOP_LEFT,
) -> tuple[float, ...]:
    """The refiner's (``requires_aesthetics_score``): original_size + crops + (score,)."""
    original = original_size or (height, width)
    return tuple(float(v) for v in (*original, *crop_top_left, aesthetic_score))


def adm_vector(pooled: torch.Tensor, time_ids: torch.Tensor, embed_dim: int) -> torch.Tensor:
    """``y`` = cat(pooled [B, P], embedding of each time id [B, n * embed_dim]), as diffusers'
    ``text_time`` addition embedding (``add_time_proj`` then concat) and SGM build it."""
    batch = pooled.shape[0]
    time_ids = torch.as_tensor(time_ids, device=pooled.device)
    time_ids = time_ids.reshape(-1, time_ids.shape[-1]).expand(batch, -1)
    embeds = timestep_embedding(time_ids.flatten(), embed_dim).reshape(batch, -1)
    return torch.cat([pooled, embeds.to(pooled.dtype)], dim=-1)


class SDXLPipeline(Pipeline):
    """A :class:`~ldm_cli.pipeline.base.Pipeline` for SDXL base, inpainting and refiner files.

    Conditioning rows are packed (``[B, 77, context_dim + adm_in_channels]``, see the module
    docstring); `unet` is the :class:`PackedConditioningUNet` that unpacks them (the plain
    U-Net is ``model.unet``). `refiner` (set by
    :func:`ldm_cli.pipeline.tasks.refiner.attach_refiner`) makes
    every run a base + refiner run. The micro-conditioning can be changed through
    `original_size`, `crop_top_left` and `target_size` (None: the image size), and the
    refiner's aesthetic scores through `aesthetic_score` / `negative_aesthetic_score`.
    """

    def __init__(
        self, model: LatentDiffusion, path: Path, device: torch.device, dtype: torch.dtype
    ):
        super().__init__(model, path, device, dtype)
        self.refiner: Refiner | None = None
        self.original_size: tuple[int, int] | None = None
        self.crop_top_left: tuple[int, int] = CROP_TOP_LEFT
        self.target_size: tuple[int, int] | None = None
        self.aesthetic_score = AESTHETIC_SCORE
        self.negative_aesthetic_score = NEGATIVE_AESTHETIC_SCORE
        if dtype == torch.float16:
            # The SDXL VAE overflows in fp16 (diffusers' force_upcast): it runs in fp32.
            model.first_stage_model.float()

    @property
    def conditioner(self) -> Conditioner:
        self._check_kept("text_encoder")
        return self.model.conditioner

    @property
    def unet(self) -> PackedConditioningUNet:
        self._check_kept("unet")
        return PackedConditioningUNet(self.model.unet, self.refiner)

    @property
    def is_refiner(self) -> bool:
        return is_refiner(self.config)

    # -- conditioning ------------------------------------------------------------------------

    @torch.inference_mode()
    def split_conditioning(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed rows as the base U-Net's (context, y)."""
        return self.unet.split(rows)

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, 77, context_dim], pooled [B, P]) of the text towers, in fp32."""
        embeddings = self.networks.embeddings  # textual inversion (ldm_cli.text.embeddings)
        if embeddings:
            from ldm_cli.text.embeddings import encode_truncated

            context, pooled = encode_truncated(embeddings, self.conditioner, list(prompts))
        else:
            context, pooled = self.conditioner.encode(list(prompts))
        return context.float(), pooled.float()

    def time_ids(self, width: int, height: int, negative: bool = False) -> tuple[float, ...]:
        if self.is_refiner:
            score = self.negative_aesthetic_score if negative else self.aesthetic_score
            return refiner_time_ids(
                width,
                height,
                score,
                original_size=self.original_size,
                crop_top_left=self.crop_top_left,
            )
        return base_time_ids(
            width,
            height,
            original_size=self.original_size,
            crop_top_left=self.crop_top_left,
            target_size=self.target_size,
        )

    @torch.inference_mode()
    def packed_conditioning(
        self, prompts: list[str], width: int, height: int, negative: bool = False
    ) -> torch.Tensor:
        """Packed rows [B, 77, context_dim + adm] of prompts taken as plain text, cut after 75
        tokens (with a refiner attached, merged with the refiner's: :func:`merge_rows`)."""
        unique = list(dict.fromkeys(prompts))
        context, pooled = self.encode_text(unique)
        ids = torch.tensor(self.time_ids(width, height, negative), device=pooled.device)
        rows = pack(context, adm_vector(pooled, ids, adm_embed_dim(self.config)))
        rows = rows[[unique.index(p) for p in prompts]].to(self.dtype)
        if self.refiner is not None:
            refiner = self.refiner.pipe
            refined = refiner.packed_conditioning(prompts, width, height, negative)
            rows = merge_rows(
                rows, self.config.unet.context_dim, refined, refiner.config.unet.context_dim
            )
        return rows

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Packed rows of `prompts` for an image of the model's native size."""
        size = self.config.default_size
        return self.packed_conditioning(list(prompts), size, size)

    @torch.inference_mode()
    def conditioning(self, requests: list[Request]):
        """Validate a batch (it may differ in prompts and seeds only); (cond, uncond or None),
        PromptBatch objects of packed rows (the A1111 prompt syntax, as for SD 1.x/2.x)."""
        from ldm_cli.pipeline.conditioning import batch_requests

        head = requests[0]
        for r in requests:
            self.validate(r)
            if replace(r, seed=head.seed, prompt=head.prompt, negative_prompt="") != replace(
                head, negative_prompt=""
            ):
                raise ValueError("a batch must share everything but prompts and seeds")
        requests = self.networks.activate(requests)  # <lora:...> applied, tags stripped
        size = (head.width, head.height)

        def encode(prompts: list[str], negative: bool) -> dict[str, ScheduledFeatures]:
            return self.scheduled_conditioning(prompts, head.steps, *size, negative=negative)

        return batch_requests(requests, encode, self.empty_features)

    def scheduled_conditioning(
        self, prompts: list[str], steps: int, width: int, height: int, negative: bool = False
    ) -> dict[str, ScheduledFeatures]:
        """Every distinct prompt's packed rows over `steps` (with a refiner attached, merged
        with the refiner's)."""
        own = self.schedules(prompts, steps, width, height, negative)
        if self.refiner is None:
            return own
        refiner = self.refiner.pipe
        refined = refiner.schedules(prompts, steps, width, height, negative)
        dims = (self.config.unet.context_dim, refiner.config.unet.context_dim)
        merged = {}
        for prompt, mine in own.items():
            theirs = refined[prompt]
            if theirs.ends != mine.ends:
                raise ValueError(f"the refiner's schedule of {prompt!r} differs from the base's")
            merged[prompt] = ScheduledFeatures(
                mine.ends,
                tuple(
                    merge_rows(a[None], dims[0], b[None], dims[1])[0]
                    for a, b in zip(mine.features, theirs.features, strict=True)
                ),
            )
        return merged

    def schedules(
        self, prompts: list[str], steps: int, width: int, height: int, negative: bool
    ) -> dict[str, ScheduledFeatures]:
        from ldm_cli.pipeline.conditioning import encode_schedules

        embeddings = self.networks.embeddings  # textual inversion (ldm_cli.text.embeddings)
        pooled_of: dict[tuple[int, ...], torch.Tensor] = {}

        def encoder(tokens: torch.Tensor) -> torch.Tensor:
            context, pooled = self._encode_tokens(tokens.to(self.device))
            for row, vector in zip(tokens.tolist(), pooled, strict=True):
                pooled_of[tuple(row)] = vector
            return context

        ids = torch.tensor(self.time_ids(width, height, negative), device=self.device)
        embed_dim = adm_embed_dim(self.config)

        def finish(features: torch.Tensor, first_chunk) -> torch.Tensor:
            """The text features [L, D] with `y` of the text's first chunk at every token."""
            y = adm_vector(pooled_of[first_chunk.ids][None], ids.to(features.device), embed_dim)
            return pack(features[None], y)[0]

        return encode_schedules(
            self.tokenizer,
            encoder,
            prompts,
            steps,
            self.dtype,
            embeddings=embeddings,
            finish=finish,
        )

    def _encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text features [N, 77, context_dim], pooled [N, P]) of 77-token rows, in fp32;
        placeholder ids stand for textual-inversion vectors."""
        embeddings = self.networks.embeddings
        if embeddings:
            context, pooled = embeddings.encode(self.conditioner, tokens)
        else:
            context, pooled = self.conditioner(tokens)
        return context.float(), pooled.float()

    def empty_features(self) -> torch.Tensor:
        """The empty prompt's text features [77, context_dim] (the base's, then the
        refiner's): what pads the shorter side of the guidance (ldm_cli.text.batch)."""
        from ldm_cli.text.chunks import empty_chunk

        def text(pipe: SDXLPipeline) -> torch.Tensor:
            tokens = torch.tensor([empty_chunk(pipe.tokenizer).ids], device=pipe.device)
            return pipe._encode_tokens(tokens)[0][0].to(self.dtype)

        parts = [text(self)]
        if self.refiner is not None:
            parts.append(text(self.refiner.pipe).to(parts[0].device))
        return torch.cat(parts, dim=-1)

    def parameters_text(
        self,
        req: Request,
        extra: dict[str, str] | None = None,
        second_pass: tuple[int, int] | None = None,
    ) -> str:
        if self.refiner is not None:
            refiner = self.refiner
            extra = {
                **(extra or {}),
                "Refiner": f"{refiner.pipe.name} [{refiner.pipe.model_hash}]",
                "Refiner switch at": f"{refiner.switch:g}",
            }
        return super().parameters_text(req, extra, second_pass)
