"""The training noise schedule shared by every sampler, read from the bundle's scheduler_config.json.

Arithmetic follows diffusers' schedulers (which hold alphas_cumprod in float32): betas -> alphas_cumprod ->
the timesteps a given spacing selects (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
are Flawed", table 2: linspace, leading, trailing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from ...errors import InvalidRequest

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: bool = True  # DDIM's default; SD's config sets it to false
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        cfg = cls(**kwargs)
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise InvalidRequest(f"scheduler prediction_type {cfg.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if cfg.timestep_spacing not in SPACINGS:
            raise InvalidRequest(f"scheduler timestep_spacing {cfg.timestep_spacing!r} is not one of {SPACINGS}")
        if cfg.thresholding:
            raise InvalidRequest("scheduler thresholding (dynamic thresholding, for pixel-space models) is not "
                                 "supported; set \"thresholding\": false in scheduler/scheduler_config.json")
        return cfg


def betas(cfg: SchedulerConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        b = np.asarray(cfg.trained_betas, dtype=np.float64)
    elif cfg.beta_schedule == "linear":
        b = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
    elif cfg.beta_schedule == "scaled_linear":  # Stable Diffusion's schedule
        b = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine schedule
        bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)])
    else:
        raise InvalidRequest(f"scheduler beta_schedule {cfg.beta_schedule!r} is not one of "
                             "linear, scaled_linear, squaredcos_cap_v2")
    b = b.astype(np.float32)
    return _rescale_zero_terminal_snr(b) if cfg.rescale_betas_zero_snr else b


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step is pure noise."""
    sqrt_bar = np.sqrt(np.cumprod(1.0 - b, dtype=np.float32))
    first, last = sqrt_bar[0].copy(), sqrt_bar[-1].copy()
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    bar = sqrt_bar**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """(num_train_timesteps,) float32, as diffusers computes it."""
    return np.cumprod(1.0 - betas(cfg), dtype=np.float32)


def spaced_timesteps(cfg: SchedulerConfig, steps: int, integer: bool) -> np.ndarray:
    """Descending model timesteps for `steps` inference steps. `integer` rounds linspace spacing (DDIM does,
    Euler keeps the fractions)."""
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        t = np.linspace(0, n - 1, steps, dtype=np.float64 if integer else np.float32)[::-1]
        t = t.round() if integer else t
    elif cfg.timestep_spacing == "leading":
        t = (np.arange(0, steps) * (n // steps)).round()[::-1] + cfg.steps_offset
    else:  # trailing
        t = np.arange(n, 0, -n / steps).round() - 1
    return np.ascontiguousarray(t, dtype=np.float64)
