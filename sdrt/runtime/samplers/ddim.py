"""DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12. Checked against diffusers'
`DDIMScheduler`. eta = 0 is deterministic; eta > 0 adds sigma_t * z with z from the request's generator.

    x0   = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x'   = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * z
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
"""
from __future__ import annotations

import numpy as np

from .base import Sampler
from .schedule import alphas_cumprod, spaced_timesteps


class DDIM(Sampler):
    name, label, diffusers_class = "ddim", "DDIM", "DDIMScheduler"
    takes_eta = True

    def __init__(self, scheduler_config: dict, steps: int, eta: float = 0.0):
        super().__init__(scheduler_config, steps)
        config = self.config
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        self.timesteps = spaced_timesteps(config, steps, integer=True)
        self.alphas_cumprod = alphas_cumprod(config)
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        # diffusers steps back by num_train // steps whatever the spacing
        self.stride = config.num_train_timesteps // steps

    def _alpha(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(self, model_output, i, x, rng):
        t = int(self.timesteps[i])
        a_t, a_prev = self._alpha(t), self._alpha(t - self.stride)
        b_t = 1 - a_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0, eps = (x - np.sqrt(b_t) * model_output) / np.sqrt(a_t), model_output
        elif kind == "v_prediction":
            x0 = np.sqrt(a_t) * x - np.sqrt(b_t) * model_output
            eps = np.sqrt(a_t) * model_output + np.sqrt(b_t) * x
        else:  # "sample"
            x0 = model_output
            eps = (x - np.sqrt(a_t) * x0) / np.sqrt(b_t)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = np.clip(x0, -r, r)
        variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
        std = self.eta * np.sqrt(variance)
        x_prev = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - std**2) * eps
        if self.eta > 0:
            x_prev = x_prev + std * rng.standard_normal(x.shape, dtype=np.float32)
        return x_prev.astype(np.float32)

    def add_noise(self, x0, noise, i):
        a = self.alphas_cumprod[int(self.timesteps[i])]
        return (np.sqrt(a) * x0 + np.sqrt(1 - a) * noise).astype(np.float32)
