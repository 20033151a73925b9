"""Samplers by name: sdrt's names, AUTOMATIC1111's labels and diffusers' class names all resolve here.

One sampler per module, each with the `step()` contract of base.Sampler and its reference named at its top;
schedule.py builds the noise schedules they share, fmath.py the correctly rounded scalar math. Pure numpy:
the pipeline imports this package, and it imports nothing of the pipeline's.
"""
from __future__ import annotations

from numbers import Real

from ...errors import InvalidRequest, UnknownSampler
from .base import Sampler
from .ddim import DDIM
from .dpmpp_2m import DPMPP2M, DPMPP2MKarras
from .dpmpp_2m_sde import DPMPP2MSDEKarras
from .euler import Euler
from .euler_a import EulerAncestral
from .heun import Heun
from .lcm import LCM
from .lms import LMS, LMSKarras
from .pndm import PNDM
from .schedule import SchedulerConfig
from .unipc import UniPC

# Listed as `sdrt info` shows them; a diffusers class name means its plain variant, listed before the Karras one.
SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (
    DDIM, PNDM, LMS, LMSKarras, Euler, EulerAncestral, Heun, DPMPP2M, DPMPP2MKarras, DPMPP2MSDEKarras, UniPC, LCM)}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum() or ch == "+")


_ALIASES: dict[str, str] = {}
for _cls in SAMPLERS.values():
    for _alias in (_cls.name, _cls.label, _cls.diffusers_class):
        _ALIASES.setdefault(_key(_alias), _cls.name)


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def resolve(name: str) -> type[Sampler]:
    """"euler", "Euler", "EulerDiscreteScheduler" -> Euler. Unknown names list the known ones."""
    if not isinstance(name, str) or _key(name) not in _ALIASES:
        known = [f"{c.name} ({c.label})" for c in SAMPLERS.values()]
        raise UnknownSampler(str(name), known)
    return SAMPLERS[_ALIASES[_key(name)]]


def make_sampler(name: str, scheduler_config: dict, steps: int, eta: float | None = None) -> Sampler:
    """`eta`: the stochasticity of DDIM (0 deterministic, 1 DDPM-like); other samplers refuse it."""
    cls = resolve(name)
    if eta is None:
        return cls(scheduler_config, steps)
    if not cls.takes_eta:
        takers = ", ".join(c.name for c in SAMPLERS.values() if c.takes_eta)
        raise InvalidRequest(f"sampler {cls.name!r} takes no eta; eta applies to {takers}")
    if isinstance(eta, bool) or not isinstance(eta, Real) or not 0 <= eta <= 1:
        raise InvalidRequest(f"eta must be a number from 0 to 1, got {eta!r}")
    return cls(scheduler_config, steps, eta=float(eta))


__all__ = ["Sampler", "SchedulerConfig", "SAMPLERS", "make_sampler", "resolve", "sampler_names"]
