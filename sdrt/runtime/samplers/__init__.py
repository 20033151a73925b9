"""Samplers by name: sdrt's names, AUTOMATIC1111's labels and diffusers' class names all resolve here."""
from __future__ import annotations

from ...errors import UnknownSampler
from .base import Sampler
from .ddim import DDIM
from .euler import Euler
from .schedule import SchedulerConfig

SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (Euler, DDIM)}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum() or ch == "+")


_ALIASES = {_key(alias): cls.name for cls in SAMPLERS.values()
            for alias in (cls.name, cls.label, cls.diffusers_class)}


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


def resolve(name: str) -> type[Sampler]:
    """"euler", "Euler", "EulerDiscreteScheduler" -> Euler. Unknown names list the known ones."""
    if not isinstance(name, str) or _key(name) not in _ALIASES:
        known = [f"{c.name} ({c.label})" for c in SAMPLERS.values()]
        raise UnknownSampler(str(name), known)
    return SAMPLERS[_ALIASES[_key(name)]]


def make_sampler(name: str, scheduler_config: dict, steps: int) -> Sampler:
    return resolve(name)(scheduler_config, steps)


__all__ = ["Sampler", "SchedulerConfig", "SAMPLERS", "make_sampler", "resolve", "sampler_names"]
