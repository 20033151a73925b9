"""UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", algorithms 2 and 3 (B(h) variant). Checked against diffusers' `UniPCMultistepScheduler` with its
defaults: solver_order 2, solver_type "bh2", predict_x0, lower_order_final, every corrector on, final sigma 0.

In the half-log-SNR lambda = log(alpha_t / sigma_t), with alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t,
h = lambda_t - lambda_s0, hh = -h, B(h) = expm1(hh) and m = the x0 estimate at each step:

    UniP:  x_t = sigma_t / sigma_s0 * x - alpha_t * expm1(hh) * m0 - alpha_t * B(h) * sum_k rho_k * D_k
    UniC:  x_t <- the same from x_s0, with the new model output m_t adding rho_t * (m_t - m0)
    D_k = (m_k - m0) / r_k,  r_k = (lambda_k - lambda_s0) / h,  rho solves R rho = b (1/2 for UniP-2, UniC-1)

The corrector needs the model output at the step it corrects, so `step(eps, i, x)` first corrects x (the
predictor's result from step i-1) with eps, then predicts step i+1, as diffusers' `step` does. Scalar arithmetic
is float32, as diffusers does it on torch float32 tensors.
"""
from __future__ import annotations

import numpy as np

from . import fmath
from .base import Sampler
from .euler import training_sigmas
from .schedule import solver_timesteps

F32 = np.float32


def alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """VP coefficients of a sigma (diffusers' `_sigma_to_alpha_sigma_t`)."""
    alpha_t = F32(1) / np.sqrt(sigma**2 + F32(1))
    return alpha_t, sigma * alpha_t


# Scalar log and expm1 correctly rounded to float32 (fmath), as torch's scalar float32 libm calls nearly always
# are; sigma 0 (the final step) gives log 0 = -inf, so lambda = +inf, as in diffusers.
def _log(v: np.float32) -> np.float32:
    return F32(fmath.log(v))


def _expm1(v: np.float32) -> np.float32:
    return F32(fmath.expm1(v))


def half_log_snr(sigma: np.float32) -> np.float32:
    alpha_t, sigma_t = alpha_sigma(sigma)
    return _log(alpha_t) - _log(sigma_t)


class UniPC(Sampler):
    name, label, diffusers_class = "unipc", "UniPC", "UniPCMultistepScheduler"
    config_defaults = {"timestep_spacing": "linspace"}
    # Sampler-defining: a bundle config saved by a tuned UniPC (Karras sigmas, order 3, bh1) must not change
    # what "unipc" means.
    diffusers_config = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                        "disable_corrector": [], "final_sigmas_type": "zero", "use_karras_sigmas": False,
                        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False}

    def __init__(self, scheduler_config: dict, steps: int):
        super().__init__(scheduler_config, steps)
        o = self.options
        self.solver_order = int(o.get("solver_order", 2))
        self.bh1 = o.get("solver_type", "bh2") == "bh1"
        self.predict_x0 = bool(o.get("predict_x0", True))
        self.lower_order_final = bool(o.get("lower_order_final", True))
        self.disable_corrector = set(o.get("disable_corrector") or [])
        self.timesteps = solver_timesteps(self.config, steps).astype(np.float64)
        train = training_sigmas(self.config)
        # diffusers: "sigma_min" ends on the sigma of t = 0, "zero" on sigma 0 (the last step returns x0)
        last = train[0] if o.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
        sigmas = np.interp(self.timesteps, np.arange(len(train)), train)
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)  # (N+1,)
        self.init_noise_sigma = 1.0
        # Multistep state for this request: newest model output last, as diffusers keeps it.
        self.model_outputs: list = [None] * self.solver_order
        self.last_sample = None  # x before the last predictor, which the next corrector starts from
        self.lower_order_nums = 0  # steps taken since the run began (warm-up: order grows with history)
        self.this_order = 1

    def _convert(self, model_output, i, x):
        """The model output as the solver's variable: x0 (predict_x0) or eps."""
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i])
        kind = self.config.prediction_type
        if self.predict_x0:
            if kind == "epsilon":
                return (x - sigma_t * model_output) / alpha_t
            return alpha_t * x - sigma_t * model_output if kind == "v_prediction" else model_output
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return alpha_t * model_output + sigma_t * x
        return (x - alpha_t * model_output) / sigma_t

    def _terms(self, s0, order, x):
        """What UniP and UniC share for the step from sigma index s0 to s0 + 1: the order-1 update, the scale
        of the higher-order terms, the differences D_k of older outputs and the system R rho = b."""
        alpha_t, sigma_t = alpha_sigma(self.sigmas[s0 + 1])
        alpha_s0, sigma_s0 = alpha_sigma(self.sigmas[s0])
        lambda_s0 = half_log_snr(self.sigmas[s0])
        h = half_log_snr(self.sigmas[s0 + 1]) - lambda_s0
        m0 = self.model_outputs[-1]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (half_log_snr(self.sigmas[s0 - k]) - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        rks = np.array(rks + [F32(1)], dtype=np.float32)
        hh = -h if self.predict_x0 else h
        h_phi_1 = _expm1(hh)  # h * phi_1(h) = e^h - 1
        b_h = hh if self.bh1 else _expm1(hh)
        h_phi_k, factorial, b = h_phi_1 / hh - F32(1), 1, []
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - F32(1) / factorial
        r = np.stack([rks ** (k - 1) for k in range(1, order + 1)])
        if self.predict_x0:
            base, scale = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t * b_h
        else:
            base, scale = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t * b_h
        return base, scale, d1s, r, np.array(b, dtype=np.float32)

    def _predict(self, i, x, order):
        base, scale, d1s, r, b = self._terms(i, order, x)
        if not d1s:  # order 1. diffusers adds scale * 0 here, NaN for bh1 at a final sigma of 0 (scale -inf)
            return base
        # diffusers: a fixed rho = 1/2 at order 2 rather than solving the 1x1 system
        rhos = np.full(1, 0.5, np.float32) if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
        return base - scale * _weighted(rhos, d1s)

    def _correct(self, model_x0, i, order):
        base, scale, d1s, r, b = self._terms(i - 1, order, self.last_sample)
        rhos = np.full(1, 0.5, np.float32) if order == 1 else np.linalg.solve(r, b)
        corr = _weighted(rhos[:-1], d1s) if d1s else 0
        return base - scale * (corr + rhos[-1] * (model_x0 - self.model_outputs[-1]))

    def step(self, model_output, i, x, rng):
        converted = self._convert(model_output, i, x)
        if i > 0 and i - 1 not in self.disable_corrector and self.last_sample is not None:
            x = self._correct(converted, i, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [converted]
        order = min(self.solver_order, len(self.timesteps) - i) if self.lower_order_final else self.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up: no more history than steps taken
        self.last_sample = x
        x_next = self._predict(i, x, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        return x_next.astype(np.float32)

    def add_noise(self, x0, noise, i):
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i])
        return (alpha_t * x0 + sigma_t * noise).astype(np.float32)


def _weighted(rhos, d1s):
    """sum_k rho_k D_k, summed in k order as diffusers' einsum does."""
    total = rhos[0] * d1s[0]
    for rho, d in zip(rhos[1:], d1s[1:]):
        total = total + rho * d
    return total
