"""Euler ancestral: Karras et al. 2022 Euler step to sigma_down, then fresh noise up to sigma_next (Ho et al.
2020's ancestral sampling in sigma form; k-diffusion `sample_euler_ancestral`, eta 1). Checked against
diffusers' `EulerAncestralDiscreteScheduler`. Noise comes from the request's generator, one draw per step.

    sigma_up   = sqrt(sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2)
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x <- x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up * z
"""
from __future__ import annotations

import numpy as np

from .euler import Euler, predict_x0


class EulerAncestral(Euler):
    name, label, diffusers_class = "euler_a", "Euler a", "EulerAncestralDiscreteScheduler"
    stochastic = True

    def step(self, model_output, i, x, rng):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = predict_x0(self.config, model_output, x, sigma)
        sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = np.sqrt(sigma_next**2 - sigma_up**2)
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        # diffusers draws on the last step too (where sigma_up is 0); so do we, to keep the streams aligned
        z = rng.standard_normal(x.shape, dtype=np.float32)
        return (x + z * sigma_up).astype(np.float32)
