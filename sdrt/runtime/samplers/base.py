"""The sampler contract, the same for every sampler (after diffusers' `SchedulerMixin`).

A sampler is made for one request (steps, and the bundle's scheduler config) and is stateful only in the
way multistep methods must be. Steps are addressed by index so a schedule can start part-way (img2img):

    x = sampler.init_noise_sigma * noise                   # (B, 4, H/8, W/8)
    for i in range(start, len(sampler.timesteps)):
        eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], text)
        x = sampler.step(eps, i, x, rng)

`timesteps` holds one entry per model call, so it can be longer than `steps` (Heun evaluates twice per
step, PLMS once more at the start). Every random number a sampler needs comes from `rng`, the request's
generator, whose `standard_normal(shape, dtype)` is the only call a sampler may make on it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .schedule import SchedulerConfig


class Sampler(ABC):
    name: str  # sdrt's name, e.g. "euler"
    label: str  # AUTOMATIC1111's label, written into PNG parameters
    diffusers_class: str  # the class this sampler was checked against
    stochastic: bool = False
    takes_eta: bool = False  # DDIM's eta option
    order: int = 1  # timestep entries per step, as diffusers' `scheduler.order` (img2img's start index uses it)
    diffusers_config: dict = {}  # what the diffusers class needs on top of the bundle's config to be this sampler
    # Values the diffusers class assumes when scheduler_config.json leaves them out (SD 1.5's config has no
    # timestep_spacing: DDIM then spaces "leading", Euler "linspace").
    config_defaults: dict = {}
    # Config keys the diffusers class does not have, and so ignores (Heun, LMS and PNDM know no zero-SNR rescale).
    ignored_keys: tuple = ()

    def __init__(self, scheduler_config: dict, steps: int):
        """scheduler_config: the bundle's scheduler_config.json as a dict."""
        given = {k: v for k, v in scheduler_config.items() if v is not None and k not in self.ignored_keys}
        # The sampler's defining settings win over the bundle's (a config saved by a Karras-sigma scheduler
        # must not turn plain "dpmpp_2m" into its Karras variant); class-specific keys are read from here.
        self.options = {**self.config_defaults, **given, **self.diffusers_config}
        self.config: SchedulerConfig = SchedulerConfig.from_dict(self.options)
        self.steps = steps
        self.timesteps: np.ndarray  # (N,) float64 model timesteps, descending
        self.init_noise_sigma: float

    def start_index(self, strength: float) -> int:
        """The first step index an img2img run at `strength` (in (0, 1]) takes, by diffusers'
        `StableDiffusionImg2ImgPipeline.get_timesteps` arithmetic: strength 1 starts at 0."""
        init_timestep = min(int(self.steps * strength), self.steps)
        return max(self.steps - init_timestep, 0) * self.order

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    @abstractmethod
    def step(self, model_output: np.ndarray, i: int, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """x at step i and the model's output for it -> x at step i+1."""

    @abstractmethod
    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Noise clean latents to the noise level the schedule has at step i (img2img's start)."""
