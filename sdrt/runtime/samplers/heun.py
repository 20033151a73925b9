"""Heun: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", alg. 1
(2nd-order, s_churn = 0; k-diffusion `sample_heun`). Checked against diffusers' `HeunDiscreteScheduler`.

Each step takes two model calls, so `timesteps` lists every sigma but the first and last twice,
(t0, t1, t1, t2, t2, ..., t_{N-1}, t_{N-1}): 2N-1 calls, the last step plain Euler because sigma_next is 0.

    d  = (x - x0(x, sigma)) / sigma                     first call: Euler predictor
    x' = x + d * (sigma_next - sigma)
    d' = (x' - x0(x', sigma_next)) / sigma_next         second call: trapezoid corrector
    x <- x + (d + d') / 2 * (sigma_next - sigma)
"""
from __future__ import annotations

import numpy as np

from .euler import Euler, predict_x0


class Heun(Euler):
    name, label, diffusers_class = "heun", "Heun", "HeunDiscreteScheduler"
    order = 2
    config_defaults = {"timestep_spacing": "linspace", "clip_sample": False, "beta_start": 0.00085, "beta_end": 0.012}
    ignored_keys = ("rescale_betas_zero_snr",)

    def __init__(self, scheduler_config: dict, steps: int):
        super().__init__(scheduler_config, steps)  # Euler's N timesteps and N+1 sigmas
        t, s = self.timesteps, self.sigmas
        self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)])  # (2N-1,)
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])  # (2N,)
        self._first = None  # (x, derivative, dt) of the pending predictor step

    def step(self, model_output, i, x, rng):
        if self._first is None:  # predictor
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            derivative = (x - self._x0(model_output, x, sigma)) / sigma
            dt = sigma_next - sigma
            self._first = (x, derivative, dt)
            return (x + derivative * dt).astype(np.float32)
        start, first_derivative, dt = self._first  # corrector, at sigma_next
        sigma_next = self.sigmas[i]
        derivative = (x - self._x0(model_output, x, sigma_next)) / sigma_next
        self._first = None
        return (start + (first_derivative + derivative) / 2 * dt).astype(np.float32)

    def _x0(self, model_output, x, sigma):
        x0 = predict_x0(self.config, model_output, x, sigma)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = np.clip(x0, -r, r)
        return x0
