"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", alg. 2 (multistep, second order, data prediction) with the midpoint D1 term. Checked against
diffusers' `DPMSolverMultistepScheduler` (algorithm_type "dpmsolver++", solver_order 2, solver_type
"midpoint"); the Karras variant spaces sigmas as Karras et al. 2022, eq. 5 (rho = 7).

    alpha = 1 / sqrt(sigma^2 + 1),  s = sigma * alpha,  lambda = log(alpha) - log(s)   (VP from the VE sigma)
    x0 = (x - s * eps) / alpha   (epsilon),   x0 = alpha * x - s * v   (v_prediction)
    h = lambda' - lambda,  D1 = (x0 - x0_prev) * h / h_prev
    x <- (s' / s) * x + alpha' * (1 - e^-h) * (x0 + D1 / 2)
The first step of a run is first order (D1 = 0), and so is the last one when the final sigma is 0 or the
schedule is shorter than 15 steps (diffusers' lower_order_final).
"""
from __future__ import annotations

import numpy as np

from ...errors import InvalidRequest
from . import fmath
from .base import Sampler
from .schedule import alphas_cumprod, karras_sigmas, sigma_to_t, solver_timesteps


def training_alphas_cumprod(config) -> np.ndarray:
    bar = alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        bar[-1] = 2.0**-24  # diffusers: keeps the first sigma (and lambda) finite at zero terminal SNR
    return bar


def vp(sigma: np.float32):
    """VE sigma -> (alpha_t, sigma_t, lambda_t), float32 as diffusers computes them."""
    alpha = 1 / np.sqrt(sigma * sigma + 1)
    s = sigma * alpha
    # final sigma 0: log 0 = -inf, so lambda = inf, e^-h = 0 and the step lands on x0
    return alpha, s, fmath.log(alpha) - fmath.log(s)


class DPMPP2M(Sampler):
    name, label, diffusers_class = "dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler"
    # Every sigma-schedule switch is pinned: a bundle saved with another one must not change this sampler.
    diffusers_config = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                        "use_lu_lambdas": False, "use_flow_sigmas": False}
    config_defaults = {"timestep_spacing": "linspace"}

    def __init__(self, scheduler_config: dict, steps: int):
        super().__init__(scheduler_config, steps)
        opts = self.options
        if opts.get("variance_type") in ("learned", "learned_range"):
            raise InvalidRequest("scheduler variance_type 'learned' (pixel-space models) is not supported by "
                                 f"{self.name}; remove it from scheduler/scheduler_config.json")
        final = opts.get("final_sigmas_type", "zero")
        if final not in ("zero", "sigma_min"):
            raise InvalidRequest(f"scheduler final_sigmas_type {final!r} is not one of zero, sigma_min")
        bar = training_alphas_cumprod(self.config)
        train = np.sqrt((1 - bar) / bar)  # float32, ascending in t
        timesteps, sigmas = self._schedule(bar, train)
        self.timesteps = timesteps.astype(np.int64).astype(np.float64)  # diffusers truncates fractional ones
        sigma_last = 0.0 if final == "zero" else train[0]
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)  # (N+1,)
        self.init_noise_sigma = 1.0
        self.last_is_first_order = (bool(opts.get("euler_at_final", False)) or final == "zero"
                                    or (bool(opts.get("lower_order_final", True)) and len(self.timesteps) < 15))
        self._x0_prev, self._taken = None, 0  # multistep state: counts steps since this run began

    def _last_timestep(self, bar: np.ndarray) -> int:
        """One past the last timestep whose lambda reaches lambda_min_clipped (for cosine schedules)."""
        clip = float(self.options.get("lambda_min_clipped", -np.inf))
        lam = fmath.log(np.sqrt(bar)) - fmath.log(np.sqrt(1 - bar))
        return self.config.num_train_timesteps - int(np.searchsorted(lam[::-1], clip))

    def _schedule(self, bar, train):
        t = solver_timesteps(self.config, self.steps, self._last_timestep(bar))
        return t, np.interp(t, np.arange(len(train)), train)

    def _data_prediction(self, model_output, x, alpha, s):
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x - s * model_output) / alpha
        if kind == "v_prediction":
            return alpha * x - s * model_output
        return model_output  # "sample"

    def _coefficients(self, alpha_next, s_next, s, h):
        """(a, b, c) of x' = a x + b (x0 + D1/2) + c z; b = -alpha'(e^-h - 1) bit for bit, as 1 - e = -(e - 1)."""
        return s_next / s, alpha_next * (1 - fmath.exp(-h)), None

    def _noise(self, shape, rng):
        return None

    def step(self, model_output, i, x, rng):
        alpha, s, lam = vp(self.sigmas[i])
        alpha_next, s_next, lam_next = vp(self.sigmas[i + 1])
        x0 = self._data_prediction(model_output, x, alpha, s)
        noise = self._noise(model_output.shape, rng)  # drawn every step, where diffusers draws it
        first = self._taken == 0 or (i == len(self.timesteps) - 1 and self.last_is_first_order)
        h = lam_next - lam
        a, b, c = self._coefficients(alpha_next, s_next, s, h)
        # Same operation order as diffusers, so float32 rounding matches too.
        out = a * x + b * x0
        if not first:
            with np.errstate(divide="ignore"):  # h = 0 (Karras + sigma_min's last step): D1 = 0, as in torch
                r = (lam - vp(self.sigmas[i - 1])[2]) / h
            out = out + 0.5 * b * ((1.0 / r) * (x0 - self._x0_prev))
        if noise is not None:
            out = out + c * noise
        self._x0_prev, self._taken = x0, self._taken + 1
        return out.astype(np.float32)

    def add_noise(self, x0, noise, i):
        alpha, s, _ = vp(self.sigmas[i])
        return (alpha * x0 + s * noise).astype(np.float32)


class DPMPP2MKarras(DPMPP2M):
    name, label = "dpmpp_2m_karras", "DPM++ 2M Karras"
    diffusers_config = {**DPMPP2M.diffusers_config, "use_karras_sigmas": True}

    def _schedule(self, bar, train):
        # between the training schedule's extremes (not the spaced ones, as Euler's Karras variant does)
        sigmas = karras_sigmas(float(train[0]), float(train[-1]), self.steps)
        t = sigma_to_t(sigmas, fmath.log(train))
        # diffusers leaves cosine-schedule timesteps fractional (then truncates them); others it rounds
        return (t if self.config.beta_schedule == "squaredcos_cap_v2" else t.round()), sigmas
