"""Euler: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", alg. 2
with s_churn = 0 (k-diffusion `sample_euler`). Checked against diffusers' `EulerDiscreteScheduler`
(interpolation_type "linear", final_sigmas_type "zero").

    sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])
    x0 = x - sigma * eps                              (epsilon)
    x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)   (v_prediction)
    x <- x + (x - x0) / sigma * (sigma_next - sigma)
"""
from __future__ import annotations

import numpy as np

from . import fmath
from .base import Sampler
from .schedule import SchedulerConfig, alphas_cumprod, karras_sigmas, sigma_to_t, spaced_timesteps


def training_sigmas(config: SchedulerConfig) -> np.ndarray:
    bar = alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        bar[-1] = 2.0**-24  # diffusers: keeps the terminal sigma finite (it would be infinite at zero SNR)
    return np.sqrt((1 - bar) / bar)  # float32, ascending in t


def predict_x0(config: SchedulerConfig, model_output, x, sigma):
    """The denoised estimate in sigma parametrisation (k-diffusion's Discrete{Eps,V}DDPMDenoiser)."""
    if config.prediction_type == "epsilon":
        return x - sigma * model_output
    if config.prediction_type == "v_prediction":
        return model_output * (-sigma / np.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    return model_output  # "sample"


class Euler(Sampler):
    name, label, diffusers_class = "euler", "Euler", "EulerDiscreteScheduler"
    config_defaults = {"timestep_spacing": "linspace"}

    karras = False  # re-space the sigmas by Karras et al.'s rule (diffusers' use_karras_sigmas)

    def __init__(self, scheduler_config: dict, steps: int):
        super().__init__(scheduler_config, steps)
        config = self.config
        self.timesteps = spaced_timesteps(config, steps, integer=False)
        train = training_sigmas(config)
        sigmas = np.interp(self.timesteps, np.arange(len(train)), train)  # (N,) float64
        if self.karras:  # between the spacing-selected sigmas' ends (diffusers' `_convert_to_karras`)
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
            self.timesteps = sigma_to_t(sigmas, fmath.log(train)).astype(np.float32).astype(np.float64)  # as diffusers keeps them
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (N+1,)
        top = float(self.sigmas.max())
        # diffusers: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading
        self.init_noise_sigma = top if config.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def scale_model_input(self, x, i):
        return x / np.sqrt(self.sigmas[i] ** 2 + 1)

    def step(self, model_output, i, x, rng):
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = predict_x0(self.config, model_output, x, sigma)
        derivative = (x - x0) / sigma
        return (x + derivative * (sigma_next - sigma)).astype(np.float32)

    def add_noise(self, x0, noise, i):
        return (x0 + noise * self.sigmas[i]).astype(np.float32)
