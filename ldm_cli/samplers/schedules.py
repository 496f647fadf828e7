"""The discrete noise schedule of SD-style models, step spacings, and the sigma-space denoiser.

Everything here lives in k-diffusion's *sigma space*: a noisy latent is ``x = x0 + sigma * eps``
and the U-Net, trained on the variance-preserving ``z = sqrt(a) x0 + sqrt(1 - a) eps``, sees
``z = x / sqrt(sigma^2 + 1)`` where ``sigma = sqrt((1 - a) / a)`` and ``a = alphas_cumprod[t]``.

The sigma table is computed in float32 exactly as diffusers computes it (betas, cumprod and
sigmas all in float32), so step spacings reproduce diffusers' schedulers bit for bit. CompVis
LDM, k-diffusion, A1111 and ComfyUI build the same table in float64 and round it to float32
afterwards; the two differ by up to ~1.3e-5 relative (``DiscreteSchedule(cfg, "compvis")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ldm_cli.core.config import ScheduleConfig
from ldm_cli.core.errors import UserError

SPACINGS: tuple[str, ...] = (
    "normal",
    "karras",
    "exponential",
    "simple",
    "sgm_uniform",
    "leading",
    "trailing",
    "lcm",
)

SPACING_HELP: dict[str, str] = {
    "normal": "diffusers' Euler 'linspace': t evenly spaced from 999 to 0, sigma linearly "
    "interpolated in the sigma table",
    "karras": "Karras et al. (2022), rho = 7, between the schedule's sigma_min and sigma_max",
    "exponential": "evenly spaced in log sigma between sigma_max and sigma_min",
    "simple": "ComfyUI's 'simple': every (1000/steps)-th entry of the sigma table, from the top",
    "sgm_uniform": "ComfyUI's 'sgm_uniform': steps+1 points evenly spaced in t from 999 to 0, "
    "the last dropped",
    "leading": "diffusers' DDIM/DDPM 'leading' with steps_offset=1: t = k * (1000 // steps) + 1",
    "trailing": "diffusers' 'trailing': t = round(1000 - k * 1000 / steps) - 1, from t = 999 "
    "(what SDXL-Lightning, Hyper-SD and SDXL-Turbo expect)",
    "lcm": "LCMScheduler's/TCDScheduler's: steps picked evenly from the 50 distillation "
    "timesteps 999, 979, ..., 19",
}

# LCMScheduler/TCDScheduler's original_inference_steps: the distillation's own timesteps
LCM_ORIGINAL_STEPS = 50

FINAL_SIGMAS: tuple[str, ...] = ("zero", "sigma_min")


class DiscreteSchedule:
    """The 1000-entry scaled-linear schedule and the maps between sigma and (fractional) t.

    ``alphas_cumprod`` and ``sigmas`` are float32 (index t, ascending in sigma); ``log_sigmas``
    is float64 so that ``sigma_to_t`` of a table entry returns its integer t exactly.
    ``reference`` picks how the table is rounded: "diffusers" (float32 throughout) or
    "compvis" (float64, rounded at the end, as CompVis LDM and k-diffusion do).
    """

    def __init__(self, cfg: ScheduleConfig | None = None, reference: str = "diffusers"):
        cfg = cfg or ScheduleConfig()
        if reference not in ("diffusers", "compvis"):
            raise ValueError(f"unknown schedule reference {reference!r}")
        work = torch.float32 if reference == "diffusers" else torch.float64
        n = cfg.num_train_timesteps
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=work) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.config = cfg
        self.num_train_timesteps = n
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = sigmas.float()
        self.log_sigmas = self.sigmas.double().log()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])
        self._device_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _log_sigmas_on(self, device: torch.device) -> torch.Tensor:
        # MPS has no float64; elsewhere float64 keeps sigma_to_t exact on table entries.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        key = (device, dtype)
        if key not in self._device_tables:
            self._device_tables[key] = self.log_sigmas.to(device=device, dtype=dtype)
        return self._device_tables[key]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional t whose log-sigma, interpolated linearly between table entries, is sigma's.

        The same map as k-diffusion's ``DiscreteSchedule.sigma_to_t`` and diffusers'
        ``_sigma_to_t``, clamped to [0, 999]. Runs on sigma's device without a host sync.
        """
        sigma = torch.as_tensor(sigma)
        log_sigmas = self._log_sigmas_on(sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).clamp(min=1e-10).log()
        last = log_sigmas.shape[0] - 1
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, last - 1)
        low_log, high_log = log_sigmas[low], log_sigmas[low + 1]
        w = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
        out_dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        return (low + w).to(out_dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at fractional t, interpolating log-sigma linearly (k-diffusion's map)."""
        t = torch.as_tensor(t)
        log_sigmas = self._log_sigmas_on(t.device)
        t = t.to(log_sigmas.dtype).clamp(0, log_sigmas.shape[0] - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        out_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().to(out_dtype)


def _normal(schedule: DiscreteSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    # diffusers builds t with np.linspace in float64 and casts to float32, then np.interp in
    # float64 over the float32 table: same operations, same values.
    t = torch.linspace(0, schedule.num_train_timesteps - 1, steps, dtype=torch.float64)
    t = t.float().double().flip(0)
    table = schedule.sigmas.double()
    low = t.floor().long().clamp(max=table.shape[0] - 2)
    w = t - low
    sigmas = table[low] + (table[low + 1] - table[low]) * w
    return sigmas, t


def _karras(schedule: DiscreteSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv = schedule.sigma_max ** (1 / rho)
    min_inv = schedule.sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _exponential(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    log_max, log_min = math.log(schedule.sigma_max), math.log(schedule.sigma_min)
    return torch.linspace(log_max, log_min, steps, dtype=torch.float64).exp()


def _simple(schedule: DiscreteSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = schedule.num_train_timesteps
    stride = n / steps
    t = torch.tensor([n - 1 - int(k * stride) for k in range(steps)], dtype=torch.float64)
    return schedule.sigmas.double()[t.long()], t


def _sgm_uniform(schedule: DiscreteSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.linspace(schedule.num_train_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1]
    return schedule.t_to_sigma(t), t


def _leading(schedule: DiscreteSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = schedule.num_train_timesteps
    if steps >= n:
        raise UserError(
            f"the 'leading' schedule (ddim's and ddpm's default) takes at most {n - 1} steps, got "
            f"{steps}; use fewer steps or another --scheduler"
        )
    t = (torch.arange(steps, dtype=torch.float64) * (n // steps) + 1).flip(0)
    return schedule.sigmas.double()[t.long()], t


def _trailing(schedule: DiscreteSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = schedule.num_train_timesteps
    if steps > n:
        raise UserError(f"the 'trailing' schedule takes at most {n} steps, got {steps}")
    # np.arange(n, 0, -n / steps).round() - 1; torch.round rounds halves to even, as numpy
    t = (n - torch.arange(steps, dtype=torch.float64) * (n / steps)).round() - 1
    return schedule.sigmas.double()[t.long()], t


def _lcm(schedule: DiscreteSchedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, original = schedule.num_train_timesteps, LCM_ORIGINAL_STEPS
    if steps > original:
        raise UserError(
            f"the 'lcm' schedule (lcm's and tcd's) takes at most {original} steps, got {steps}; "
            "few-step samplers are meant for 1 to 8"
        )
    origin = (torch.arange(1, original + 1, dtype=torch.float64) * (n // original) - 1).flip(0)
    # np.floor(np.linspace(0, original, steps, endpoint=False))
    picks = [math.floor(k * original / steps) for k in range(steps)]
    t = origin[picks]
    return schedule.sigmas.double()[t.long()], t


def _spaced(schedule: DiscreteSchedule, steps: int, spacing: str):
    """(sigmas, timesteps) for every step, float64; timesteps None where t = sigma_to_t."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if spacing == "normal":
        return _normal(schedule, steps)
    if spacing == "karras":
        return _karras(schedule, steps), None
    if spacing == "exponential":
        return _exponential(schedule, steps), None
    if spacing == "simple":
        return _simple(schedule, steps)
    if spacing == "sgm_uniform":
        return _sgm_uniform(schedule, steps)
    if spacing == "leading":
        return _leading(schedule, steps)
    if spacing == "trailing":
        return _trailing(schedule, steps)
    if spacing == "lcm":
        return _lcm(schedule, steps)
    raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")


def get_sigmas(
    schedule: DiscreteSchedule, steps: int, spacing: str = "normal", *, final: str = "zero"
) -> torch.Tensor:
    """The ``steps + 1`` descending sigmas of a sampling run, float32 on the CPU.

    Spacings (``SPACINGS``):

    - ``normal``: diffusers' EulerDiscreteScheduler, timestep_spacing="linspace":
      t = linspace(0, 999, steps) reversed, sigma by *linear* interpolation of the table.
      (k-diffusion/A1111/ComfyUI "normal" interpolate log-sigma instead.)
    - ``karras``: rho-7 ramp between sigma_min and sigma_max (diffusers use_karras_sigmas).
    - ``exponential``: uniform in log sigma between sigma_max and sigma_min.
    - ``simple``: ComfyUI's; table entries 999 - int(k * 1000 / steps).
    - ``sgm_uniform``: ComfyUI's; t = linspace(999, 0, steps + 1)[:-1], log-sigma interpolation.
    - ``leading``: diffusers' DDIM/DDPM with steps_offset=1: t = k * (1000 // steps) + 1.
    - ``trailing``: diffusers' timestep_spacing="trailing": t = round(1000 - k * 1000 / steps) - 1.
    - ``lcm``: LCMScheduler/TCDScheduler: ``steps`` of the 50 distillation timesteps
      999, 979, ..., 19, picked at indices floor(k * 50 / steps).

    ``final`` is the last sigma: "zero" (fully denoised; every sampler's default) or
    "sigma_min" (the table's first entry, ``sqrt((1 - a0) / a0)`` ~ 0.0292). DDIM in diffusers
    (set_alpha_to_one=False) and CompVis stops at alphas_cumprod[0], i.e. "sigma_min"; the
    sampler then returns x at that sigma, and the latent diffusers would hold is
    ``to_vp_latent(x, sigmas[-1])``.
    """
    if final not in FINAL_SIGMAS:
        raise ValueError(f"final must be one of {FINAL_SIGMAS}, got {final!r}")
    sigmas, _ = _spaced(schedule, steps, spacing)
    last = 0.0 if final == "zero" else schedule.sigma_min
    if final == "sigma_min" and abs(float(sigmas[-1]) - last) <= 1e-6 * last:
        raise ValueError(f"spacing {spacing!r} already ends at sigma_min; use final='zero'")
    return torch.cat([sigmas, sigmas.new_tensor([last])]).float()


def get_timesteps(schedule: DiscreteSchedule, steps: int, spacing: str = "normal") -> torch.Tensor:
    """The U-Net timestep of each of the ``steps`` non-final sigmas, float32.

    This is the ``t`` the reference implementation passes to the U-Net: for ``normal`` the
    float linspace diffusers uses (up to ~0.003 away from ``sigma_to_t`` of the linearly
    interpolated sigma), for ``leading``/``simple`` the integer timesteps, otherwise
    ``sigma_to_t`` of the (float64) sigmas. Pin them with ``Denoiser(pinned_timesteps=...)``.
    """
    sigmas, timesteps = _spaced(schedule, steps, spacing)
    if timesteps is None:
        timesteps = schedule.sigma_to_t(sigmas)
    return timesteps.float()


def init_noise_sigma(first_sigma: float, spacing: str) -> float:
    """Factor for unit noise to start a txt2img run at ``first_sigma``, as diffusers does.

    "leading" (DDIM, DDPM, Euler-leading) and "lcm" (LCMScheduler, TCDScheduler) start from
    pure noise in the U-Net's variance-preserving space, i.e. ``sqrt(sigma^2 + 1)`` in sigma
    space; the other spacings start at ``sigma`` like k-diffusion and diffusers'
    linspace/trailing/karras Euler.
    """
    if spacing in ("leading", "lcm"):
        return math.sqrt(first_sigma**2 + 1)
    return first_sigma


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (number, 0-d or [B]) shaped to broadcast against x [B, ...]."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def eps_to_x0(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x0 from a noise prediction: x = x0 + sigma * eps."""
    return x - _per_sample(sigma, x) * eps


def v_to_x0(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 from a v prediction, with x in sigma space.

    With z = x / sqrt(sigma^2 + 1) = alpha x0 + s eps (alpha = 1/sqrt(sigma^2+1),
    s = sigma/sqrt(sigma^2+1)) and v = alpha eps - s x0: x0 = alpha z - s v
    = x * c_skip + v * c_out, c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1).
    """
    sigma = _per_sample(sigma, x)
    return x / (sigma**2 + 1) - v * sigma / (sigma**2 + 1) ** 0.5


def to_vp_latent(x: torch.Tensor, sigma) -> torch.Tensor:
    """The variance-preserving latent z = x / sqrt(sigma^2 + 1) (what diffusers' DDIM holds)."""
    return x / (_per_sample(sigma, x) ** 2 + 1) ** 0.5


class Denoiser:
    """Wraps a U-Net ``unet_fn(z, t, **cond) -> eps | v`` as a sigma-space denoiser -> x0.

    ``prediction`` is "eps" or "v". The U-Net gets ``z = x / sqrt(sigma^2 + 1)`` and
    ``t = schedule.sigma_to_t(sigma)`` as a float tensor [B], unless sigma is one of
    ``pinned_timesteps = (sigmas, timesteps)`` (exact float match), in which case the pinned t
    is used: pass ``(get_sigmas(...)[:-1], get_timesteps(...))`` to feed the U-Net exactly the
    timesteps diffusers feeds it.
    """

    def __init__(
        self,
        unet_fn: Callable[..., torch.Tensor],
        schedule: DiscreteSchedule,
        prediction: str = "eps",
        pinned_timesteps: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.unet_fn = unet_fn
        self.schedule = schedule
        self.prediction = prediction
        self._pinned = None
        if pinned_timesteps is not None:
            sigmas, timesteps = (torch.as_tensor(v).flatten() for v in pinned_timesteps)
            if sigmas.shape != timesteps.shape:
                raise ValueError("pinned sigmas and timesteps differ in length")
            self._pinned = (sigmas, timesteps)
        self._pinned_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """U-Net timesteps for per-sample sigmas [B]."""
        t = self.schedule.sigma_to_t(sigma)
        if self._pinned is None:
            return t
        if sigma.device not in self._pinned_on:
            sig, ts = self._pinned
            self._pinned_on[sigma.device] = (sig.to(sigma.device), ts.to(sigma.device))
        table_sigmas, table_t = self._pinned_on[sigma.device]
        match = sigma.to(table_sigmas.dtype)[:, None] == table_sigmas[None, :]
        pinned = table_t[match.int().argmax(dim=1)].to(t.dtype)
        return torch.where(match.any(dim=1), pinned, t)

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        s = _per_sample(sigma, x)
        z = (x * (s**2 + 1).rsqrt()).to(x.dtype)
        out = self.unet_fn(z, self.timesteps(sigma), **cond)
        to_x0 = eps_to_x0 if self.prediction == "eps" else v_to_x0
        x0 = to_x0(x, out, sigma)
        return x0.to(x.dtype)
