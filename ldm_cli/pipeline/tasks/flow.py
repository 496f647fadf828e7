"""The flow-matching models' pipeline: FLUX.1 dev/schnell and Stable Diffusion 3/3.5.

The render path is the one every model takes (`base.Pipeline.render`): conditioning, a CPU
generator per image, the start, `sample`, decode. What differs is here:

- **Text.** FLUX reads CLIP-L's pooled output and T5's features (`t5_tokens`, 512 for dev,
  256 for schnell); SD3 both CLIPs' penultimate layers zero-padded to T5's width with T5's
  features after them, and the two CLIPs' projected pooled outputs
  (`models.flow_text`). Prompts are plain text, as diffusers takes them: A1111's emphasis,
  editing and `AND` syntax is not read (the characters reach the encoders as they are). Each
  conditioning row carries the pooled vector after every token's features
  (`sdxl_packed_rows.pack`), so guidance and batching move it unchanged.
- **Sampling.** Flow time sigma from 1 to 0 with the model's shift (`samplers.flow`); the
  transformer predicts a velocity, the denoiser returns ``x - sigma * v``, and the ODE
  samplers integrate it in flow space (`FLOW_SAMPLERS`). SD3 uses classifier-free guidance
  (`--cfg`, default 4.5/3.5/7 by release); FLUX dev takes `--guidance` (3.5) as an input and
  runs one pass per step, with `--cfg` above 1 adding a second, unconditional pass (diffusers'
  `true_cfg_scale`); FLUX schnell has neither.
- **LoRAs.** ``<lora:NAME:W>`` tags and ``--lora`` apply as for SD (`networks.lora`), with the
  names of FLUX's and SD3's LoRA files (`networks.flow_keys`); the PNG records their hashes.
- **Latents.** 16 channels, ``(z - shift_factor) * scale_factor`` (`vae_codec`); img2img and
  inpainting noise them as ``(1 - sigma) * latents + sigma * noise`` (`image_start`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ldm_cli.core.errors import UserError
from ldm_cli.core.flow_config import FlowModelConfig
from ldm_cli.core.pngmeta import GenerationParams, format_number, format_parameters
from ldm_cli.models.flow_model import FlowDiffusion
from ldm_cli.networks.flow_keys import is_text_encoder_name
from ldm_cli.pipeline.base import Pipeline
from ldm_cli.pipeline.request import Request
from ldm_cli.pipeline.tasks.sdxl_packed_rows import pack, unpack
from ldm_cli.samplers.flow import (
    dynamic_shift_sigmas,
    flow_x0,
    flux_mu,
    static_shift_sigmas,
)

PATCH = 2  # both transformers cut the latents into 2x2 patches


class FlowPipeline(Pipeline):
    """A :class:`~ldm_cli.pipeline.base.Pipeline` for FLUX.1 and SD3/3.5 (module docstring)."""

    config: FlowModelConfig
    model: FlowDiffusion

    @property
    def is_flow(self) -> bool:
        return True

    def setup_family(self) -> None:
        self.schedule = None
        self.tokenizer = None
        self.file_clip_skip = 1
        self.file_prediction = "flow"

    @property
    def size_multiple(self) -> int:
        return self.latent_factor * PATCH

    @property
    def is_inpainting(self) -> bool:
        return False

    @property
    def is_upscaler(self) -> bool:
        return False

    @property
    def default_steps(self) -> int:
        return self.config.default_steps

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        f = self.latent_factor
        return (1, self.config.latent_channels, height // f, width // f)

    # -- requests ---------------------------------------------------------------------------

    def validate(self, req: Request) -> None:
        super().validate(replace(req, guidance=None))
        unsupported = {
            "--control": bool(req.control),
            "--deep-cache": req.deep_cache > 1,
            "--token-merging": bool(req.token_merging),
        }
        for option, given in unsupported.items():
            if given:
                raise UserError(f"{option} does not work with {self.config.family} models yet")
        if req.guidance is not None and not self.takes_guidance:
            raise UserError(
                f"--guidance is FLUX dev's distilled guidance; {self.config.family} has none "
                "(use --cfg)"
            )
        if req.guidance is not None and not abs(req.guidance) < float("inf"):
            raise UserError(f"--guidance must be a finite number, got {req.guidance}")

    @property
    def takes_guidance(self) -> bool:
        return self.config.is_flux and self.config.transformer.guidance_embed

    def guidance_value(self, req: Request) -> float | None:
        if not self.takes_guidance:
            return None
        return self.config.default_guidance if req.guidance is None else req.guidance

    # -- conditioning -----------------------------------------------------------------------

    def conditioning(self, requests: list[Request]):
        """Packed rows (context, then the pooled vector) of the prompts, and of the negative
        prompts where the run makes an unconditional pass (cfg != 1)."""
        head = requests[0]
        for r in requests:
            self.validate(r)
            if replace(r, seed=head.seed, prompt=head.prompt, negative_prompt="") != replace(
                head, negative_prompt=""
            ):
                raise ValueError("a batch must share everything but prompts and seeds")
        self.check_loras(head)
        requests = self.networks.activate(requests)  # <lora:...> applied, tags stripped
        cond = self.encode_rows([r.prompt for r in requests])
        if head.cfg == 1.0:
            return cond, None
        return cond, self.encode_rows([r.negative_prompt for r in requests])

    def check_loras(self, req: Request) -> None:
        """A LoRA that changes none of this transformer's layers while some of its own are a
        denoiser's (an SD U-Net LoRA, FLUX's on SD3) is an error: its text-encoder layers
        alone would apply, CLIP-L's names being shared."""
        for _, path in self.networks.wanted(req.prompt):
            lora = self.networks.file(path)
            if any(layer.target.component == "unet" for layer in lora.layers):
                continue
            foreign = [name for name in lora.unmatched if not is_text_encoder_name(name)]
            if foreign:
                some = ", ".join(sorted(foreign)[:2])
                raise UserError(
                    f"LoRA {path.name} is not for {self.config.family} models: none of its "
                    f"{len(foreign)} denoiser layers ({some}, ...) is in this transformer (a "
                    "LoRA for another model family?)"
                )

    @torch.inference_mode()
    def encode_rows(self, prompts: list[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(prompts))
        encoders, tokens = self.text_encoder, self.config.t5_tokens
        if self.config.is_flux:
            context, pooled = encoders.encode_flux(unique, tokens)
        else:
            context, pooled = encoders.encode_sd3(unique, tokens)
        rows = pack(context.float(), pooled.float())
        return rows[[unique.index(p) for p in prompts]].to(self.device)

    # -- sampling ---------------------------------------------------------------------------

    def sigmas(self, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's flow times, 1 down to 0 (`samplers.flow`), and the timesteps 1000 t."""
        cfg = self.config
        if cfg.is_flux:
            tokens = (req.height // self.size_multiple) * (req.width // self.size_multiple)
            mu = flux_mu(tokens) if cfg.dynamic_shift else None
            sigmas = dynamic_shift_sigmas(req.steps, mu)
        else:
            sigmas = static_shift_sigmas(req.steps, cfg.shift)
        return sigmas, sigmas[:-1] * 1000

    def denoiser(self, unet_fn, req: Request, sigmas, timesteps):
        """`(x, sigma, context=rows) -> x0` over the transformer, in the model's dtype (it
        takes the context and pooled vector apart, and FLUX dev's guidance, so `unet_fn`,
        the U-Net call of `base.Pipeline.sample`, is not used)."""
        transformer, dtype = self.unet, self.dtype
        width = transformer_context_width(self.config)
        guidance = self.guidance_value(req)

        def x0(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            ctx, pooled = unpack(context, width, context.shape[-1] - width)
            extra = {}
            if guidance is not None:
                extra["guidance"] = torch.full_like(sigma, guidance, dtype=dtype)
            v = transformer(x.to(dtype), sigma.to(dtype), ctx.to(dtype), pooled.to(dtype), **extra)
            return flow_x0(x, sigma, v.float())

        return x0

    def split_conditioning(self, rows: torch.Tensor):
        width = transformer_context_width(self.config)
        return unpack(rows, width, rows.shape[-1] - width)

    # -- output -----------------------------------------------------------------------------

    def parameters_text(
        self,
        req: Request,
        extra: dict[str, str] | None = None,
        second_pass: tuple[int, int] | None = None,
    ) -> str:
        """A1111/Forge parameters: Forge's "Distilled CFG Scale" for FLUX dev."""
        from ldm_cli.pipeline.infotext import vae_parameters
        from ldm_cli.pipeline.vae_codec import tiling_parameters

        extra = {**vae_parameters(self), **(extra or {})}
        guidance = self.guidance_value(req)
        if guidance is not None:
            extra = {"Distilled CFG Scale": format_number(guidance), **extra}
        extra.update(tiling_parameters(self, req, second_pass))
        extra.update(self.networks.parameters(req))  # "Lora hashes" (A1111)
        return format_parameters(
            GenerationParams(
                prompt=req.prompt,
                negative_prompt=req.negative_prompt,
                steps=req.steps,
                sampler=req.sampler,
                scheduler="simple",
                cfg_scale=req.cfg,
                seed=req.seed,
                width=req.width,
                height=req.height,
                model_hash=self.model_hash,
                model_name=self.name,
                extra=extra,
            )
        )


def transformer_context_width(cfg: FlowModelConfig) -> int:
    """The width of the transformer's text features (T5's, also SD3's padded CLIP features)."""
    return cfg.transformer.context_in_dim
