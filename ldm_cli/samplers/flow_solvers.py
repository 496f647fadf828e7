"""DPM-Solver++ and UniPC for rectified-flow models: 2M, UniPC-bh2, DPM++ SDE and 2M SDE.

A flow model's sample at time sigma is ``x = alpha * x0 + sigma * noise`` with ``alpha = 1 -
sigma``; the exponential integrators work in the half log-SNR ``lambda = log(alpha / sigma)``,
``h = lambda_next - lambda`` the step. Dividing by alpha turns the flow sample into the
variance-exploding one, ``y = x / alpha = x0 + q * noise`` with ``q = sigma / alpha =
e^-lambda``, and every solver here is its VE form (`samplers.dpmpp`, `samplers.unipc`) run on
``(y, q)`` and multiplied back by alpha; written out in x, the first-order data-prediction step
is ``x' = (sigma' / sigma) x + alpha' (1 - e^-h) x0``, the flow Euler step itself.

- `sample_dpmpp_2m_flow` is diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
  prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2)``.
- `sample_unipc_flow` is diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True,
  prediction_type="flow_prediction")``: UniPC-bh2, order 2, predictor and corrector.
- `sample_dpmpp_sde_flow` and `sample_dpmpp_2m_sde_flow` are ComfyUI's ``dpmpp_sde`` and
  ``dpmpp_2m_sde`` on a CONST (flow) model, which step in the same half log-SNR.

Sigma 1 (alpha 0, lambda = -inf), where every flow schedule starts:
- 2M takes the limit: its first step is the first-order one, ``x' = sigma' x + alpha' x0``,
  and the next step's second-order term is weighted by ``h / h_prev = 0``. diffusers' formulas
  give exactly that when handed sigma 1 (its own flow sigmas start at ``shift(0.999)``).
- UniPC moves a first sigma within 1e-6 of 1 down by 1e-6, as diffusers' ``set_timesteps``
  does with flow sigmas (its weights need a finite lambda); the model is called there.
- The SDE samplers move a first sigma of 1 to ``1 - 1e-4``, ComfyUI's
  ``offset_first_sigma_for_snr``. ComfyUI takes that point (``percent_to_sigma(1e-4)``) on the
  model's shifted timeline, which a sampler does not know: ``1 - 1e-4`` is the unshifted one.

Scalars are float64 on the host (`common.SigmaRun`), tensors see finished coefficients.
"""

from __future__ import annotations

import math

import torch

from ldm_cli.samplers.common import (
    Callback,
    Generators,
    Model,
    SigmaRun,
    ancestral_split,
    check_generator,
    gaussian_like,
)

UNIPC_FIRST_NUDGE = 1e-6  # diffusers' UniPCMultistepScheduler.set_timesteps, flow sigmas
SDE_FIRST_OFFSET = 1e-4  # ComfyUI's offset_first_sigma_for_snr(percent_offset=1e-4)
LOWER_ORDER_FINAL_STEPS = 15  # diffusers' DPM-Solver: a last step to sigma > 0 is first order


def _flow_run(sigmas: torch.Tensor) -> SigmaRun:
    run = SigmaRun(sigmas)
    if any(not 0 <= s <= 1 for s in run.values):
        raise ValueError("flow sigmas must lie in [0, 1]")
    return run


def _move_first(run: SigmaRun, value: float) -> None:
    """Replace the first sigma, rounded to the dtype the denoiser receives sigmas in."""
    run.values[0] = float(torch.tensor(value, dtype=run.dtype, device="cpu"))


def _lam(sigma: float) -> float:
    """Half log-SNR log((1 - sigma) / sigma): -inf at sigma 1, +inf at sigma 0."""
    if sigma >= 1:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _q(sigma: float) -> float:
    """The VE sigma sigma / (1 - sigma) = e^-lambda of a flow sigma below 1."""
    return sigma / (1 - sigma)


def _sigma_of_q(q: float) -> float:
    return q / (1 + q)


def sample_dpmpp_2m_flow(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    **extra,
) -> torch.Tensor:
    """DPM-Solver++(2M) on the flow ODE, diffusers' flow-prediction DPMSolverMultistep step.

    ``x' = (sigma' / sigma) x + alpha' (1 - e^-h) (m0 + (h / h_prev) (m0 - m1) / 2)`` with m0,
    m1 this and the last step's x0; the first step, a last step to 0 (which returns m0) and
    the last step of a run under 15 steps are first order (lower_order_final).
    """
    run = _flow_run(sigmas)
    n = run.steps
    prev_x0: torch.Tensor | None = None
    prev_h = math.inf
    for i in range(n):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = _lam(sigma_next) - _lam(sigma)
            target = x0
            first_order = i == n - 1 and n < LOWER_ORDER_FINAL_STEPS
            if prev_x0 is not None and not first_order:
                target = x0 + (x0 - prev_x0) * (0.5 * h / prev_h)  # 0 after sigma 1
            x = x * (sigma_next / sigma) + target * ((1 - sigma_next) * -math.expm1(-h))
            prev_h = h
        prev_x0 = x0
        if callback is not None:
            callback(i, x, x0)
    return x


def _unipc_rhos(h: float, ratios: list[float], order: int, corrector: bool) -> list[float]:
    """The bh2 weights: rho solves R rho = b, R the rows r^(k-1) over ratios + [1] and
    b_k = k! (-h) phi_(k+1)(-h) / B(h), B(h) = expm1(-h); the predictor drops the last row
    and column. UniP-2 and UniC-1 use 1/2, as diffusers does."""
    if (not corrector and order == 2) or (corrector and order == 1):
        return [0.5]
    hh = -h
    b_h = math.expm1(hh)
    h_phi = math.expm1(hh) / hh - 1  # hh * phi_2(hh)
    factorial = 1
    nodes = [*ratios, 1.0]
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in nodes])
        rhs.append(h_phi * factorial / b_h)
        factorial *= k + 1
        h_phi = h_phi / hh - 1 / factorial
    if not corrector:
        rows, rhs = [row[:-1] for row in rows[:-1]], rhs[:-1]
    solution = torch.linalg.solve(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
    )
    return solution.tolist()


def _unipc_update(x, history, sigma_t, order, x0_t=None):
    """UniP-order from history[-1] to sigma_t, or UniC-order when x0_t (the x0 at the
    predicted point) is given; history holds (sigma, lambda, x0), oldest first."""
    sigma_0, lam_0, m0 = history[-1]
    h = _lam(sigma_t) - lam_0
    alpha_t = 1 - sigma_t
    decay = -math.expm1(-h)  # 1 - e^-h = -B(h)
    ratios, diffs = [], []
    for k in range(1, order):
        _, lam_k, m_k = history[-(k + 1)]
        r = (lam_k - lam_0) / h
        ratios.append(r)
        diffs.append((m_k - m0) / r)
    out = x * (sigma_t / sigma_0) + m0 * (alpha_t * decay)
    corrector = x0_t is not None
    if not diffs and not corrector:
        return out
    rhos = _unipc_rhos(h, ratios, order, corrector)
    if corrector:
        diffs.append(x0_t - m0)
    for rho, diff in zip(rhos, diffs, strict=True):
        out = out + diff * (alpha_t * decay * rho)
    return out


def sample_unipc_flow(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    order: int = 2,
    **extra,
) -> torch.Tensor:
    """UniPC-bh2 on the flow ODE, diffusers' flow-prediction UniPCMultistep step (order 2).

    Predictor ``x' = (sigma' / sigma) x + alpha' (1 - e^-h) (m0 + sum rho_k D_k)``, D_k = (m_k -
    m0) / r_k over the earlier points, r_k = (lambda_k - lambda_0) / h; once the model has seen
    x', the corrector redoes that step with D_t = m_t - m0 added (no extra call). Orders warm up
    from 1 and drop at the end (lower_order_final); a first sigma of 1 moves down by 1e-6.
    """
    run = _flow_run(sigmas)
    n = run.steps
    if n and abs(run.values[0] - 1) < UNIPC_FIRST_NUDGE:
        _move_first(run, run.values[0] - UNIPC_FIRST_NUDGE)
    history: list[tuple[float, float, torch.Tensor]] = []
    x_before = None  # the sample the last predictor started from
    last_order = 0
    for i in range(n):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if x_before is not None:
            x = _unipc_update(x_before, history, sigma, last_order, x0_t=x0)
        history.append((sigma, _lam(sigma), x0))
        if len(history) > order:
            history.pop(0)
        last_order = min(order, n - i, len(history))  # warm-up and lower_order_final
        x_before = x
        x = x0 if sigma_next == 0 else _unipc_update(x, history, sigma_next, last_order)
        if callback is not None:
            callback(i, x, x0)
    return x


def _offset_start(run: SigmaRun) -> None:
    if run.steps and run.values[0] >= 1:
        _move_first(run, 1 - SDE_FIRST_OFFSET)


def sample_dpmpp_2m_sde_flow(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    **extra,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint, on a flow model (ComfyUI's dpmpp_2m_sde on CONST).

    With g = 1 - e^-(1+eta)h and w a standard normal:
    ``x' = (sigma'/sigma) e^-(eta h) x + alpha' g (m0 + (h / h_prev)(m0 - m1) / 2)
    + sigma' sqrt(1 - e^-(2 eta h)) s_noise w``.
    For x = alpha x0 + sigma n and m0 = m1 = x0 the x0 weight is alpha' (as (sigma'/sigma) alpha
    = alpha' e^-h) and the noise has variance sigma'^2 e^-(2 eta h) + sigma'^2 (1 - e^-(2 eta h))
    = sigma'^2: the step keeps the marginal (1 - sigma') x0 + sigma' noise. eta = 0 is 2M.
    A step to sigma 0 returns the x0 prediction; a first sigma of 1 becomes 1 - 1e-4.
    """
    noisy = eta > 0 and s_noise > 0
    if noisy:
        check_generator(generator, "dpmpp_2m_sde")
    run = _flow_run(sigmas)
    _offset_start(run)
    prev_x0: torch.Tensor | None = None
    prev_h = math.inf
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = _lam(sigma_next) - _lam(sigma)
            gain = (1 - sigma_next) * -math.expm1(-(1 + eta) * h)
            x = x * (sigma_next / sigma * math.exp(-eta * h)) + x0 * gain
            if prev_x0 is not None:
                x = x + (x0 - prev_x0) * (0.5 * gain * h / prev_h)
            if noisy:
                scale = sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
                x = x + gaussian_like(x, generator) * scale
            prev_h = h
        prev_x0 = x0
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_dpmpp_sde_flow(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: Generators | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    **extra,
) -> torch.Tensor:
    """DPM-Solver++ SDE (r = 1/2) on a flow model (ComfyUI's dpmpp_sde on CONST): two calls/step.

    In the VE variables (y = x / alpha, q = sigma / alpha) each (sub)step is k-diffusion's
    ancestral one: from q to q_to, ``(q_down, q_up) = ancestral_split(q, q_to, eta)``, then
    ``x_to = alpha_to ((q_down / q) x / alpha + (1 - q_down / q) x0 + q_up s_noise w)``, which
    for x = alpha x0 + sigma n keeps x0's weight alpha_to and gives the noise alpha_to^2 (q_down^2
    + q_up^2) = sigma_to^2. The sub-step goes to the lambda midpoint (q_mid = sqrt(q q')) with
    this step's x0, the full step to sigma' with the midpoint's x0. The noises are increments of
    one Brownian motion over flow sigma, as ComfyUI's Brownian tree over its sigmas: w1 over
    [sigma_mid, sigma], w2 over [sigma', sigma_mid], the full step their normalised sum. A step to
    sigma 0 returns the x0 prediction; a first sigma of 1 becomes 1 - 1e-4.
    """
    noisy = eta > 0 and s_noise > 0
    if noisy:
        check_generator(generator, "dpmpp_sde")
    run = _flow_run(sigmas)
    _offset_start(run)
    for i in range(run.steps):
        sigma, sigma_next = run.pair(i)
        x0 = run.denoise(model, x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            alpha, q, q_next = 1 - sigma, _q(sigma), _q(sigma_next)
            sigma_mid = _sigma_of_q(math.sqrt(q * q_next))
            w1 = w2 = None
            if noisy:
                w1, w2 = gaussian_like(x, generator), gaussian_like(x, generator)
            # sub-step to the midpoint with this step's x0
            alpha_mid = 1 - sigma_mid
            down, up = ancestral_split(q, _q(sigma_mid), eta)
            x_mid = x * (alpha_mid / alpha * down / q) + x0 * (alpha_mid * (1 - down / q))
            if w1 is not None and up > 0:
                x_mid = x_mid + w1 * (alpha_mid * up * s_noise)
            x0_mid = run.denoise(model, x_mid, sigma_mid)
            # full step with the midpoint's x0 (for r = 1/2 the weights are 0 and 1)
            alpha_next = 1 - sigma_next
            down, up = ancestral_split(q, q_next, eta)
            x = x * (alpha_next / alpha * down / q) + x0_mid * (alpha_next * (1 - down / q))
            if w1 is not None and up > 0:
                span_1, span_2 = sigma - sigma_mid, sigma_mid - sigma_next
                increment = (w1 * math.sqrt(span_1) + w2 * math.sqrt(span_2)) / math.sqrt(
                    span_1 + span_2
                )
                x = x + increment * (alpha_next * up * s_noise)
        if callback is not None:
            callback(i, x, x0)
    return x
