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
from . import fmath

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
        b = np.asarray(cfg.trained_betas, dtype=np.float32)
    elif cfg.beta_schedule == "linear":
        b = _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":  # Stable Diffusion's schedule
        b = _linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine schedule
        bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=np.float32)
    else:
        raise InvalidRequest(f"scheduler beta_schedule {cfg.beta_schedule!r} is not one of "
                             "linear, scaled_linear, squaredcos_cap_v2")
    return _rescale_zero_terminal_snr(b) if cfg.rescale_betas_zero_snr else b


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) bit for bit (diffusers builds its betas with it): a float32
    step, the first half counted up from start and the second half down from end."""
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(max(n - 1, 1))
    i = np.arange(n)
    return np.where(i < n // 2, start32 + step * i, end32 - step * (n - 1 - i)).astype(np.float32)


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step is pure noise."""
    sqrt_bar = np.sqrt(_cumprod_f32(1.0 - b))
    first, last = sqrt_bar[0].copy(), sqrt_bar[-1].copy()
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    bar = sqrt_bar**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """(num_train_timesteps,) float32, as diffusers computes it."""
    return _cumprod_f32(1.0 - betas(cfg))


def _cumprod_f32(a: np.ndarray) -> np.ndarray:
    return np.cumprod(a.astype(np.float64)).astype(np.float32)  # torch's CPU cumprod: float64 accumulator


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


def solver_timesteps(config: SchedulerConfig, steps: int, last: int | None = None) -> np.ndarray:
    """Integer timesteps of diffusers' multistep solvers (DPM-Solver++, UniPC), whose linspace and leading
    spacings lay out steps + 1 points and drop the last (so SD's 20 linspace steps end at t = 50, and one
    leading step is t = 501, not pure noise). `last`: one past the highest timestep allowed (DPM-Solver's
    lambda_min_clipped cuts cosine schedules short), num_train_timesteps by default."""
    last = config.num_train_timesteps if last is None else last
    if config.timestep_spacing == "linspace":
        t = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
    elif config.timestep_spacing == "leading":
        t = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + config.steps_offset
    else:  # trailing
        t = np.arange(last, 0, -config.num_train_timesteps / steps).round() - 1
    return t.astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), descending, float64 (N,)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return fmath.power(hi + ramp * (lo - hi), rho)


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional model timesteps for sigmas, by linear interpolation in log sigma between training steps
    (k-diffusion `DiscreteSchedule.sigma_to_t`, diffusers `_sigma_to_t`)."""
    log_sigma = fmath.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train_sigmas[:, np.newaxis]  # (T, N)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigmas))
