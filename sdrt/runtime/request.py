"""Checks on every request parameter: a typed error that names the value, the range, and what to do.

Shared by every generation mode, so txt2img, img2img and the rest refuse bad input the same way.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from ..errors import InvalidRequest

MAX_PROMPT_CHARS = 20_000
MAX_BATCH = 64
SEED_LIMIT = 2**64  # numpy's SeedSequence takes any non-negative integer; 64 bits covers every tool's seeds


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def check_prompt(value, what: str = "prompt") -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"{what} has {len(value)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    if "\x00" in value:
        raise InvalidRequest(f"{what} contains a NUL character; remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} contains a lone surrogate (invalid unicode); fix its encoding") from None
    return value


def check_int(value, what: str, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise InvalidRequest(f"{what} must be a whole number from {lo} to {hi}, got {value!r}")
    return int(value)


def check_guidance(value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"guidance must be a finite number >= 0 (values <= 1 turn classifier-free "
                             f"guidance off), got {value!r}")
    return float(value)


def check_seed(value) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise InvalidRequest(f"seed must be a whole number from 0 to 2**64-1 (or None for a random one), got {value!r}")
    return int(value)


def check_size(value, what: str, multiple: int) -> int:
    if not _is_int(value) or value <= 0 or value % multiple:
        hint = ""
        if _is_int(value) and value > 0:
            lo = max(multiple, value // multiple * multiple)
            hint = f"; use {lo} or {lo + multiple}"
        raise InvalidRequest(f"{what} must be a positive multiple of {multiple}, got {value!r}{hint}")
    return int(value)


def check_latents(latents, shape: tuple) -> np.ndarray:
    """Injected initial noise: standard normal, (batch, C, H/8, W/8), finite."""
    arr = np.asarray(latents)
    if arr.shape != shape:
        raise InvalidRequest(f"latents have shape {arr.shape}; this request needs {shape} (batch, channels, H/8, W/8)")
    if arr.dtype.kind != "f":
        raise InvalidRequest(f"latents must be floating point, got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise InvalidRequest("latents contain NaN or Inf")
    return arr.astype(np.float32)


class BatchNoise:
    """One numpy generator per image, seeded seed+i as AUTOMATIC1111 seeds a batch, so any image of a batch
    is reproduced alone by its own seed. `standard_normal` stacks a row from each generator."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds
        self._gens = [np.random.default_rng(s) for s in seeds]

    def standard_normal(self, shape: tuple, dtype=np.float32) -> np.ndarray:
        if shape[0] != len(self._gens):
            raise ValueError(f"noise for {shape[0]} rows requested from {len(self._gens)} generators")
        return np.stack([g.standard_normal(shape[1:], dtype=dtype) for g in self._gens])


def draw_seed() -> int:
    """A random seed for a request that gave none; it is recorded so the image can be reproduced."""
    return int(np.random.default_rng().integers(0, 2**32))
