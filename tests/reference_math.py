"""diffusers' schedulers with correctly rounded elementary functions: the reference the sampler tests compare with.

Why: diffusers computes its schedules in float32 with torch's sqrt, log and exp, which on the CPU come from
MKL's vector math, and with numpy's float32 log, whose SIMD loop is chosen per instruction set. Neither is
correctly rounded, and both differ between CPUs: on an AMD EPYC (Zen 4) 21 % of torch's float32 square roots are
an ulp from the correctly rounded value, and numpy's AVX-512 and AVX2 paths disagree on 5 % of float32 logs. The
zero-SNR rescale (sqrt(alpha_bar) - sqrt(alpha_bar_T), Lin et al. 2023) cancels, so an ulp in a square root
becomes a relative error of up to 1e-2 at the schedule's end, and a sigma -> timestep rounding can flip: the
reference itself moved between machines while sdrt (correctly rounded arithmetic, samplers/fmath.py) did not.

So the comparison runs diffusers' own code, in its own precision and order, with each float32 sqrt/log/exp/expm1
and non-integer power computed in extended precision (numpy's long double, the C library's x87 code: the same on
every x86-64 CPU) and rounded once. What remains is the difference between sdrt's formulas and diffusers': the
tests' 1e-5 bar holds with a 6x margin (largest seen: 1.6e-6, DPM++ 2M SDE Karras at 50 steps).
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

_FUNCS = ("sqrt", "log", "exp", "expm1")


def _rounded(fn: str, a: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return getattr(np, fn)(a.astype(np.longdouble)).astype(a.dtype)


def _tensor(values, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(tuple(like.shape)))


def _torch_func(fn: str, original):
    def f(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not args and not kwargs \
                and x.device.type == "cpu" and not x.requires_grad:
            return _tensor(_rounded(fn, x.numpy()), x)
        return original(x, *args, **kwargs)
    return f


def _torch_pow(original):
    def f(x, exponent):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and isinstance(exponent, float) \
                and not float(exponent).is_integer() and x.device.type == "cpu" and not x.requires_grad:
            with np.errstate(invalid="ignore"):
                return _tensor(np.power(x.numpy().astype(np.longdouble), exponent), x)
        return original(x, exponent)
    return f


def _numpy_proxy():
    """numpy as a scheduler module sees it, with float32 log/exp/sqrt rounded from long double."""
    proxy = types.ModuleType("numpy_correctly_rounded")
    proxy.__dict__.update(np.__dict__)

    def wrap(fn):
        def f(x, *args, **kwargs):
            a = np.asarray(x)
            if a.dtype == np.float32 and not args and not kwargs:
                return _rounded(fn, a)
            return getattr(np, fn)(x, *args, **kwargs)
        return f
    for fn in _FUNCS:
        setattr(proxy, fn, wrap(fn))
    return proxy


def patch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    for fn in _FUNCS:
        monkeypatch.setattr(torch, fn, _torch_func(fn, getattr(torch, fn)))
        monkeypatch.setattr(torch.Tensor, fn, _torch_func(fn, getattr(torch.Tensor, fn)))
    monkeypatch.setattr(torch.Tensor, "__pow__", _torch_pow(torch.Tensor.__pow__))
    monkeypatch.setattr(torch, "pow", _torch_pow(torch.pow))
    import diffusers

    from sdrt.runtime.samplers import SAMPLERS

    for sampler in SAMPLERS.values():  # load each scheduler module (diffusers imports them lazily)
        getattr(diffusers, sampler.diffusers_class)
    proxy = _numpy_proxy()
    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers.schedulers.scheduling_") and getattr(module, "np", None) is np:
            monkeypatch.setattr(module, "np", proxy)
