"""The sampler contract, the same for every sampler (after diffusers' `SchedulerMixin`).

A sampler is made for one request (steps, and the bundle's scheduler config) and is stateful only in the
way multistep methods must be. Steps are addressed by index so a schedule can start part-way (img2img):

    x = sampler.init_noise_sigma * noise                   # (B, 4, H/8, W/8)
    for i in range(start, len(sampler.timesteps)):
        eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], text)
        x = sampler.step(eps, i, x, rng)
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .schedule import SchedulerConfig


class Sampler(ABC):
    name: str  # sdrt's name, e.g. "euler"
    label: str  # AUTOMATIC1111's label, written into PNG parameters
    diffusers_class: str
    stochastic: bool = False
    # Values the diffusers class assumes when scheduler_config.json leaves them out (SD 1.5's config has no
    # timestep_spacing: DDIM then spaces "leading", Euler "linspace").
    config_defaults: dict = {}

    def __init__(self, scheduler_config: dict, steps: int):
        """scheduler_config: the bundle's scheduler_config.json as a dict."""
        given = {k: v for k, v in scheduler_config.items() if v is not None}
        self.config: SchedulerConfig = SchedulerConfig.from_dict({**self.config_defaults, **given})
        self.steps = steps
        self.timesteps: np.ndarray  # (N,) float64 model timesteps, descending
        self.init_noise_sigma: float

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    @abstractmethod
    def step(self, model_output: np.ndarray, i: int, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x at step i and the model's output for it -> x at step i+1."""

    @abstractmethod
    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Noise clean latents to the noise level the schedule has at step i (img2img's start)."""
