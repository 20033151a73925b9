"""PLMS: the pseudo linear multistep method of Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
on Manifolds" (PNDM), with the Runge-Kutta warm-up skipped as Stable Diffusion's config does
(skip_prk_steps). AUTOMATIC1111's "PLMS". Checked against diffusers' `PNDMScheduler`.

N steps take N+1 model calls: the second timestep is listed twice. The first two calls make a 2nd-order
start (the step t0 -> t1 is redone with the mean of eps(t0) and eps(t1)); after that, Adams-Bashforth
combinations of the last up to 4 outputs:
    (3 e1 - e2) / 2,  (23 e1 - 16 e2 + 5 e3) / 12,  (55 e1 - 59 e2 + 37 e3 - 9 e4) / 24
each applied by the DDIM (eta 0) transfer from t to t - num_train_timesteps // steps (eq. 9 of the paper):
    x' = sqrt(a'/a) x - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a'))
"""
from __future__ import annotations

import numpy as np

from .base import Sampler
from .schedule import alphas_cumprod, spaced_timesteps


class PNDM(Sampler):
    name, label, diffusers_class = "pndm", "PLMS", "PNDMScheduler"
    diffusers_config = {"skip_prk_steps": True}
    config_defaults = {"set_alpha_to_one": False}
    ignored_keys = ("rescale_betas_zero_snr", "clip_sample")

    def __init__(self, scheduler_config: dict, steps: int):
        super().__init__(scheduler_config, steps)
        config = self.config
        t = spaced_timesteps(config, steps, integer=True)[::-1]  # ascending
        self.timesteps = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].copy()  # (N+1,), t1 twice
        self.alphas_cumprod = alphas_cumprod(config)
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.stride = config.num_train_timesteps // steps  # diffusers steps back by this whatever the spacing
        self.outputs: list[np.ndarray] = []  # the model outputs the multistep formula combines, newest last
        self.calls = 0  # step() calls in this run (a part-way start counts from its first)
        self.start_sample = None

    def step(self, model_output, i, x, rng):
        t = int(self.timesteps[i])
        t_prev = t - self.stride
        if self.calls == 1:  # redo the first step with the mean of the two outputs (from its start)
            t, t_prev = t + self.stride, t
            eps, x = (model_output + self.outputs[-1]) / 2, self.start_sample
        else:
            self.outputs = [*self.outputs[-3:], model_output]
            eps = _adams_bashforth(self.outputs)
            if self.calls == 0:
                self.start_sample = x
        self.calls += 1
        return self._transfer(x, t, t_prev, eps).astype(np.float32)

    def _transfer(self, x, t, t_prev, model_output):
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        b, b_prev = 1 - a, 1 - a_prev
        if self.config.prediction_type == "v_prediction":
            model_output = np.sqrt(a) * model_output + np.sqrt(b) * x
        denominator = a * np.sqrt(b_prev) + np.sqrt(a * b * a_prev)
        return np.sqrt(a_prev / a) * x - (a_prev - a) * model_output / denominator

    def add_noise(self, x0, noise, i):
        a = self.alphas_cumprod[int(self.timesteps[i])]
        return (np.sqrt(a) * x0 + np.sqrt(1 - a) * noise).astype(np.float32)


def _adams_bashforth(outputs: list[np.ndarray]) -> np.ndarray:
    e = outputs[::-1]  # newest first
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
