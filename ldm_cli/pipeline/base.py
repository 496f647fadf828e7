"""The text-to-image pipeline: prompts -> CLIP -> guided sampler over the U-Net -> VAE -> PIL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from ldm_cli.core.errors import UserError
from ldm_cli.models.latent_diffusion import LatentDiffusion
from ldm_cli.pipeline.guidance import StepClock, cfg_denoiser
from ldm_cli.pipeline.image_start import ImageStart
from ldm_cli.pipeline.latents import Prepare, generators, text_to_image_start
from ldm_cli.pipeline.request import Request, check_request
from ldm_cli.runtime.deep_cache import deep_cache
from ldm_cli.runtime.token_merging import token_merging
from ldm_cli.samplers import SAMPLERS
from ldm_cli.samplers.flow import FLOW_SAMPLERS, flow_x0, static_shift_sigmas
from ldm_cli.samplers.schedules import (
    Denoiser,
    DiscreteSchedule,
    get_sigmas,
    get_timesteps,
    init_noise_sigma,
    to_vp_latent,
)
from ldm_cli.text.tokenizer import get_tokenizer

Progress = Callable[[int, int], None]


class Pipeline:
    """A loaded model and the stages every task shares: conditioning, sampling, decoding and
    `render`, which runs them on one batch. `api.Pipeline` adds the tasks (generate,
    img2img, inpaint, outpaint, upscale)."""

    def __init__(
        self, model: LatentDiffusion, path: Path, device: torch.device, dtype: torch.dtype
    ):
        self.model = model
        self.config = model.config
        self.path = Path(path)
        self.device = device
        self.dtype = dtype
        self.vae_tiling = "auto"  # "auto", "on" or "off": see ldm_cli.pipeline.vae_codec
        self.preview = None  # called with each step's x0 (ldm_cli.runtime.preview.PreviewWriter)
        self.released: set[str] = set()  # parts whose weights `release` gave back
        self._control_nets = None  # the ControlNets runs used, built once (control_nets)
        self.vae_file: Path | None = None  # --vae FILE, named in the PNG parameters
        self.tiny_vae = None  # a TAESD given with --vae: it decodes in the VAE's place
        self.setup_family()

    def setup_family(self) -> None:
        """What the U-Net models' stages read: the noise schedule, the CLIP tokenizer, the
        file's clip skip and prediction (a flow pipeline has none of them)."""
        self.schedule = DiscreteSchedule(self.config.schedule)
        self.tokenizer = get_tokenizer(self.config.text.pad_token_id)
        # the file's own clip skip (before a clip_skip= override): the parameters text names
        # the one used wherever it differs, so that --from-png gets it back
        self.file_clip_skip = self.config.text.clip_skip
        self.file_prediction: str | None = self.config.prediction  # None: only a probe can tell

    @property
    def control_nets(self):
        """The ControlNets this pipeline has built, by file (ldm_cli.control.apply)."""
        if self._control_nets is None:
            from ldm_cli.control.apply import ControlNets

            self._control_nets = ControlNets()
        return self._control_nets

    @property
    def unet(self):
        self._check_kept("unet")
        return self.model.unet

    @property
    def vae(self):
        return self.model.vae

    @property
    def text_encoder(self):
        self._check_kept("text_encoder")
        return self.model.text_encoder

    @property
    def name(self) -> str:
        return self.path.stem

    @cached_property
    def model_hash(self) -> str:
        from ldm_cli.checkpoints.hash import model_hash

        return model_hash(self.path)

    @cached_property
    def networks(self):
        """LoRAs and textual-inversion embeddings (ldm_cli.networks.lora.Networks)."""
        from ldm_cli.networks.lora import Networks

        return Networks(self)

    @cached_property
    def preview_matrix(self) -> torch.Tensor:
        """The fitted linear latent -> RGB map of step previews (ldm_cli.runtime.preview)."""
        from ldm_cli.runtime.preview import fit_preview_matrix

        return fit_preview_matrix(self)

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downscale

    @property
    def size_multiple(self) -> int:
        return self.latent_factor * 2 ** (len(self.config.unet.channel_mult) - 1)

    @property
    def is_inpainting(self) -> bool:
        """A U-Net that also takes a mask and masked-image latents (9 input channels)."""
        return self.config.unet.in_channels == 2 * self.config.unet.out_channels + 1

    @property
    def is_upscaler(self) -> bool:
        """An x4 upscaler: the U-Net also takes the low-res RGB image and its noise level."""
        from ldm_cli.checkpoints.detect import is_upscaler_unet

        return is_upscaler_unet(self.config.unet)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        f = self.latent_factor
        return (1, self.config.unet.out_channels, height // f, width // f)

    def release(self, part: str, room: int | None = None, reuse: bool = False) -> None:
        """Give back the memory of "unet" or "text_encoder", which this pipeline will not use
        again (a one-shot run's last batch; see release_weights): all of it, or with `room` at
        least that many bytes now and the rest at exit; with `reuse`, to this process's
        allocator where it can. Only CPU weights are freed; either way the part cannot be used
        afterwards."""
        from ldm_cli.ops.release_weights import release_module

        parts = {"unet": self.model.unet, "text_encoder": self.model.text_encoder}
        if part not in parts:
            raise ValueError(f"cannot release {part!r}; only {' or '.join(parts)}")
        release_module(parts[part], room, reuse)
        if part == "unet" and self._control_nets is not None:
            self._control_nets.release()
        self.released.add(part)

    def release_unet_before_decoding(self, latents: torch.Tensor) -> None:
        """`release("unet")` for a run whose last step is decoding `latents`, freeing only the
        room the decode will take (release_weights.decode_room), into the allocator where the
        decode's activations fit in the U-Net's tensors."""
        from ldm_cli.ops.release_weights import (
            decode_largest_activation,
            decode_room,
            owns_its_bytes,
        )

        shape, factor, itemsize = latents.shape, self.latent_factor, self.dtype.itemsize
        largest = decode_largest_activation(self.config.vae, shape, factor, itemsize)
        owned = [p for p in self.model.unet.parameters() if owns_its_bytes(p)]
        weights = max((p.nbytes for p in owned), default=0)
        room = decode_room(self.config.vae, shape, factor, itemsize)
        self.release("unet", room, reuse=largest < weights)

    def _check_kept(self, part: str) -> None:
        if part in self.released:
            raise RuntimeError(f"this pipeline's {part} was released; load the model again")

    # -- stages ---------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(tokens).to(self.dtype)

    def initial_noise(
        self, seed: int, width: int, height: int
    ) -> tuple[torch.Tensor, torch.Generator]:
        """Noise for one image, always drawn on the CPU so a seed means the same on every device."""
        gen = torch.Generator("cpu").manual_seed(seed)
        shape = self.latent_shape(width, height)
        return torch.randn(shape, generator=gen, dtype=torch.float32), gen

    @property
    def is_flow(self) -> bool:
        """A U-Net trained on the rectified-flow objective (`ldm train --objective flow`):
        it predicts the velocity noise - x0 at flow time sigma, given timestep sigma * 1000."""
        return self.config.prediction == "flow"

    def sigmas(self, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's sigmas and the U-Net timestep of each step (as diffusers feeds them)."""
        if self.is_flow:
            sigmas = static_shift_sigmas(req.steps, self.config.flow_shift)
            return sigmas, sigmas[:-1] * 1000
        info = SAMPLERS[req.sampler]
        final = info.default_final if req.spacing == info.default_spacing else "zero"
        sigmas = get_sigmas(self.schedule, req.steps, req.spacing, final=final)
        return sigmas, get_timesteps(self.schedule, req.steps, req.spacing)

    @torch.inference_mode()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        noise: torch.Tensor,
        generators: list[torch.Generator],
        req: Request,
        progress: Progress | None = None,
        start: ImageStart | None = None,
    ) -> torch.Tensor:
        """Denoise unit `noise` [B, C, h, w]; returns the latents the VAE decodes.

        `start` makes it an image-conditioned run (img2img, inpainting; see image_start).
        """
        if self.is_upscaler and getattr(start, "labels", None) is None:
            raise UserError(f"{self.name} is an x4 upscaler checkpoint: use `ldm upscale`")
        sigmas, timesteps = self.sigmas(req)
        clock = StepClock()  # prompt editing, alternation and ControlNets read the step from it
        unet_fn = _in_dtype(self.unet, self.dtype)
        if start is not None:
            unet_fn = start.wrap_unet(unet_fn)
        if req.control:
            run_steps = len(sigmas) - 1 - (start.skip if start is not None else 0)
            unet_fn = self.with_control(unet_fn, req, noise, clock, run_steps)
        denoiser = self.denoiser(unet_fn, req, sigmas, timesteps)
        model = cfg_denoiser(denoiser, cond, uncond, req.cfg, clock, rescale=req.rescale_cfg)
        noise = noise.to(self.device)
        if start is None:
            x = noise if self.is_flow else noise * init_noise_sigma(float(sigmas[0]), req.spacing)
        else:
            start = replace(start, flow=self.is_flow)
            sigmas = sigmas[start.skip :]
            if len(sigmas) == 1:  # strength 0: nothing to denoise
                return start.latents
            model = start.wrap_denoiser(model, noise)
            x = start.initial_x(noise, float(sigmas[0]), req.spacing)
        total = len(sigmas) - 1

        def on_step(i, x, x0):
            clock.finished(i)
            if progress:
                progress(i + 1, total)
            if self.preview is not None:
                self.preview(self, i + 1, total, x0)

        sigmas = sigmas.to(self.device)
        unet, (height, width) = self.unet, x.shape[-2:]
        with (
            deep_cache(unet, req.deep_cache),
            token_merging(unet, req.token_merging, height, width),
        ):
            sampler = FLOW_SAMPLERS[req.sampler] if self.is_flow else SAMPLERS[req.sampler].fn
            options = {} if req.eta is None else {"eta": req.eta}
            if not self.is_flow:  # lcm and tcd map sigmas to the table's timesteps
                options["schedule"] = self.schedule
            x = sampler(model, x, sigmas, generator=generators, callback=on_step, **options)
        # DDIM stops at the first table sigma as diffusers/CompVis do; it decodes the VP latent
        x = x if self.is_flow else to_vp_latent(x, sigmas[-1])
        return x if start is None else start.finish(x)

    def denoiser(self, unet_fn, req: Request, sigmas: torch.Tensor, timesteps: torch.Tensor):
        """`(x, sigma, **cond) -> x0` over `unet_fn(z, t, **cond)`: eps or v in sigma space
        (the U-Net fed diffusers' timesteps), or a flow U-Net's velocity."""
        if self.is_flow:
            return flow_unet_denoiser(unet_fn)
        pinned = (sigmas[:-1], timesteps)
        return Denoiser(unet_fn, self.schedule, self.config.prediction, pinned_timesteps=pinned)

    def with_control(self, unet_fn, req: Request, noise: torch.Tensor, clock, run_steps: int):
        """`unet_fn` with the residuals of the request's ControlNets (ldm_cli.control), their
        control images at the size of `noise`'s image."""
        from ldm_cli.control.apply import control_units, with_control

        size = (noise.shape[-1] * self.latent_factor, noise.shape[-2] * self.latent_factor)
        base = self.config.unet
        units = control_units(
            req.control, self.control_nets, base, size, self.device, self.dtype, self.latent_factor
        )
        return with_control(
            unet_fn,
            units,
            lambda: clock.step,
            run_steps,
            self.split_conditioning,
            req.control_mode,
            images=noise.shape[0],
        )

    def split_conditioning(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditioning rows as the U-Net's (context, y): SD 1.x/2.x rows are the context."""
        return rows, None

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        from ldm_cli.pipeline.vae_codec import decode_latents  # NaN/inf refused; tiled when large

        images = (decode_latents(self, latents) / 2 + 0.5).clamp(0, 1)
        arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]

    # -- whole requests ---------------------------------------------------------------------

    def validate(self, req: Request) -> None:
        """A one-line UserError for a request this model cannot render (request.check_request),
        or for a `vae_tiling` set to no mode, before anything is sampled."""
        from ldm_cli.pipeline.vae_codec import check_mode

        check_request(req, self.size_multiple)
        check_mode(self.vae_tiling)
        if self.is_flow:
            check_flow_request(req, self.name)
        if req.guidance is not None:
            raise UserError(
                "--guidance is FLUX dev's distilled guidance; this model takes --cfg only"
            )

    def conditioning(self, requests: list[Request]):
        """Validate a batch (it may differ in prompts and seeds only); (cond, uncond or None)."""
        head = requests[0]
        for r in requests:
            self.validate(r)
            if replace(r, seed=head.seed, prompt=head.prompt, negative_prompt="") != replace(
                head, negative_prompt=""
            ):
                raise ValueError("a batch must share everything but prompts and seeds")
        # A1111 prompt syntax, long prompts, AND; PromptBatch objects (see prompt_conditioning)
        from ldm_cli.pipeline.conditioning import encode_requests

        requests = self.networks.activate(requests)  # <lora:...> applied, tags stripped
        return encode_requests(self, requests)

    def render(
        self,
        requests: list[Request],
        progress: Progress | None = None,
        last: bool = False,
        prepare: Prepare = text_to_image_start,
    ) -> Iterator[tuple[Request, Image.Image]]:
        """Render requests as one batch; they may differ in prompts and seeds only. The one
        render path of text-to-image, img2img, inpainting and the hires fix:

        conditioning -> (release the text encoder) -> a CPU generator per image (seed + k) ->
        `prepare(pipe, head, generators)`: the start noise and what the run starts from (an
        image's latents, a mask: `pipeline.latents`; default: text to image) -> sample ->
        (release the U-Net) -> decode.

        `last`: nothing renders after this batch, so the text encoder's and the U-Net's memory
        is given back as soon as each is done (the VAE decode is where memory peaks)."""
        head = requests[0]
        cond, uncond = self.conditioning(requests)
        if last:
            self.release("text_encoder")
        gens = generators(requests)
        noise, start = prepare(self, head, gens)
        latents = self.sample(cond, uncond, noise, gens, head, progress, start)
        if last:
            self.release_unet_before_decoding(latents)
        yield from zip(requests, self.decode(latents), strict=True)

    @property
    def default_sampler(self) -> str:
        return "euler" if self.is_flow else "euler_a"

    @property
    def default_steps(self) -> int:
        return 30

    def with_defaults(self, req: Request) -> Request:
        """`req` with the model's own guidance scale, steps and sampler where they are None."""
        return replace(
            req,
            cfg=self.guidance_scale(req.cfg),
            steps=self.default_steps if req.steps is None else req.steps,
            sampler=self.default_sampler if req.sampler is None else req.sampler,
        )

    def guidance_scale(self, cfg: float | None) -> float:
        """`cfg`, or where it is None the checkpoint's own scale (`config.default_cfg`: 7.5
        unless its ldm_config names another)."""
        return self.config.default_cfg if cfg is None else cfg

    def parameters_text(
        self,
        req: Request,
        extra: dict[str, str] | None = None,
        second_pass: tuple[int, int] | None = None,
    ) -> str:
        """A1111 parameters text; `extra` adds keys such as "Denoising strength";
        `second_pass`: the size of a hires fix's decode (infotext.parameters_text)."""
        from ldm_cli.pipeline.infotext import parameters_text

        return parameters_text(self, req, extra, second_pass)


def flow_unet_denoiser(unet_fn):
    """`(x, sigma, **cond) -> x0` of a flow-objective U-Net: x - sigma * v, the U-Net given
    the noisy latents as they are and timestep sigma * 1000."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        return flow_x0(x, sigma, unet_fn(x, sigma * 1000, **cond).float())

    denoise.prediction = "flow"
    return denoise


def check_flow_request(req: Request, name: str) -> None:
    """What a flow model's run cannot take (a one-line UserError)."""
    if req.sampler not in FLOW_SAMPLERS:
        raise UserError(
            f"sampler {req.sampler!r} does not run flow models ({name}) yet; choose one of "
            f"{', '.join(FLOW_SAMPLERS)}"
        )
    if req.scheduler not in ("auto", "simple"):
        raise UserError(
            f"--scheduler {req.scheduler} does not apply to {name}: flow models use their own "
            "shifted schedule (auto)"
        )
    if req.rescale_cfg:
        raise UserError(f"--rescale-cfg does not work with flow models ({name}) yet")


def _in_dtype(unet, dtype: torch.dtype):
    """Run the network in the model dtype; samplers keep their state in fp32."""

    def call(z, t, **cond):
        # integer inputs (the x4 upscaler's noise-level labels) stay integers
        cond = {
            k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in cond.items()
        }
        return unet(z.to(dtype), t, **cond).float()

    return call
