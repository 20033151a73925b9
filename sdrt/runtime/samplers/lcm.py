"""LCM: Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step
Inference", algorithm 3 (multistep consistency sampling). Checked against diffusers' `LCMScheduler`. Meant for
LCM-distilled models; with an ordinary model it gives blurry images.

The consistency function maps x_t straight to a clean estimate, with the boundary-condition scalings of
eq. 9 (sigma_data = 0.5, s = timestep_scaling * t):

    x0       = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)
    denoised = c_out * x0 + c_skip * x
    c_skip   = sigma_data^2 / (s^2 + sigma_data^2),   c_out = s / sqrt(s^2 + sigma_data^2)
    x'       = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * z     (z ~ N(0, I); none at the last step)

Timesteps ignore timestep_spacing and steps_offset: they are `steps` evenly spaced indices into the distillation
schedule k - 1, 2k - 1, ..., n - 1 (k = n // original_inference_steps), as diffusers' `set_timesteps`.
"""
from __future__ import annotations

import numpy as np

from ...errors import InvalidRequest
from .base import Sampler
from .schedule import alphas_cumprod

F32 = np.float32
SIGMA_DATA = F32(0.5)


def lcm_timesteps(num_train_timesteps: int, original_steps: int, steps: int) -> np.ndarray:
    """diffusers' `LCMScheduler.set_timesteps` at strength 1 (its img2img path shortens the distillation
    schedule instead; sdrt starts part-way through this one, as StableDiffusionImg2ImgPipeline does)."""
    if original_steps > num_train_timesteps:
        raise InvalidRequest(f"LCM original_inference_steps {original_steps} exceeds the model's "
                             f"num_train_timesteps {num_train_timesteps}; fix scheduler/scheduler_config.json")
    if steps > original_steps:
        raise InvalidRequest(f"LCM takes at most {original_steps} steps (its original_inference_steps, the "
                             f"schedule it was distilled on), got {steps}; LCM models need only 2 to 8")
    k = num_train_timesteps // original_steps  # the paper's skipping step
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    indices = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.float64)


class LCM(Sampler):
    name, label, diffusers_class = "lcm", "LCM", "LCMScheduler"
    stochastic = True
    # LCMScheduler's own defaults differ from DDPM's (SD's betas, no clipping), so a config leaving them out
    # must get these.
    config_defaults = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "leading",
                       "original_inference_steps": 50, "timestep_scaling": 10.0}

    def __init__(self, scheduler_config: dict, steps: int):
        super().__init__(scheduler_config, steps)
        self.timestep_scaling = F32(self.options["timestep_scaling"])
        original = int(self.options["original_inference_steps"])
        self.timesteps = lcm_timesteps(self.config.num_train_timesteps, original, steps)
        # Every timestep is >= k - 1 >= 0, so diffusers' final_alpha_cumprod (set_alpha_to_one) is never used.
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.init_noise_sigma = 1.0

    def boundary_scalings(self, t: int) -> tuple[np.float32, np.float32]:
        """(c_skip, c_out), in float32 as diffusers computes them from a torch timestep."""
        s = F32(t) * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s / np.sqrt(s**2 + SIGMA_DATA**2)
        return c_skip, c_out

    def _predict_x0(self, model_output, x, a_t):
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x - np.sqrt(1 - a_t) * model_output) / np.sqrt(a_t)
        elif kind == "v_prediction":
            x0 = np.sqrt(a_t) * x - np.sqrt(1 - a_t) * model_output
        else:  # "sample"
            x0 = model_output
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = np.clip(x0, -r, r)
        return x0

    def step(self, model_output, i, x, rng):
        t = int(self.timesteps[i])
        last = i == len(self.timesteps) - 1
        a_t = self.alphas_cumprod[t]
        # diffusers: the last step has no next timestep and returns the denoised estimate itself
        a_prev = a_t if last else self.alphas_cumprod[int(self.timesteps[i + 1])]
        c_skip, c_out = self.boundary_scalings(t)
        denoised = c_out * self._predict_x0(model_output, x, a_t) + c_skip * x
        if last:
            return denoised.astype(np.float32)
        # drawn after the denoised estimate, with the model output's shape, where diffusers calls randn_tensor
        z = rng.standard_normal(model_output.shape, dtype=np.float32)
        return (np.sqrt(a_prev) * denoised + np.sqrt(1 - a_prev) * z).astype(np.float32)

    def add_noise(self, x0, noise, i):
        a = self.alphas_cumprod[int(self.timesteps[i])]
        return (np.sqrt(a) * x0 + np.sqrt(1 - a) * noise).astype(np.float32)
