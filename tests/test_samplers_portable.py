"""The samplers' numbers do not depend on the CPU: schedules and whole sampler runs are bit-identical on every
numpy SIMD path this machine has, equal a committed digest (recorded on one CPU, checked on others), equal
diffusers' own schedules bit for bit once its elementary functions are correctly rounded, and no real
configuration rounds a timestep close enough to x.5 for a CPU's last-bit difference to flip it."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from test_samplers import CONFIGS, DIFFUSERS, SD15, diffusers_scheduler

from sdrt.runtime.samplers import SAMPLERS, fmath, make_sampler
from sdrt.runtime.samplers.dpmpp_2m import training_alphas_cumprod
from sdrt.runtime.samplers.schedule import SchedulerConfig, karras_sigmas, sigma_to_t

STEPS = (1, 2, 7, 20, 50)
# schedule_digest() as computed on an AMD EPYC (Zen 4: AVX-512, VNNI) with numpy 2.4.6; equal on its AVX2 and
# SSE4.2 code paths (NPY_DISABLE_CPU_FEATURES) and under an emulated AVX2-only EPYC (qemu-x86_64 -cpu EPYC-v1).
GOLDEN_DIGEST = "bc4c4ea096a05422d5fb0116f690d7b9435b66096383f994d99ffd4fb3fa87df"


def linear_model(x: np.ndarray, t: float) -> np.ndarray:
    """A stand-in U-Net made of IEEE basic operations only (whose results no CPU rounds differently)."""
    return (np.float32(0.9) * x + np.float32(t / 1000.0)).astype(np.float32)


def schedule_digest() -> str:
    """sha256 over every sampler's timesteps, sigmas / alphas_cumprod and a whole run from fixed noise, for every
    test configuration and step count."""
    h = hashlib.sha256()
    for name in sorted(SAMPLERS):
        for config in sorted(CONFIGS):
            for steps in STEPS:
                s = make_sampler(name, CONFIGS[config], steps)
                for attr in ("timesteps", "sigmas", "alphas_cumprod"):
                    if hasattr(s, attr):
                        h.update(np.ascontiguousarray(getattr(s, attr)).tobytes())
                h.update(np.float64(s.init_noise_sigma).tobytes())
                rng = np.random.default_rng(steps)
                x = rng.standard_normal((1, 4, 4, 4), dtype=np.float32) * np.float32(s.init_noise_sigma)
                for i in range(len(s.timesteps)):
                    x = s.step(linear_model(s.scale_model_input(x, i), s.timesteps[i]), i, x, rng)
                h.update(x.tobytes())
    return h.hexdigest()


def _numpy_paths() -> dict[str, str]:
    """NPY_DISABLE_CPU_FEATURES values that make numpy take each lower SIMD path this CPU has."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    found = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    wide = [f for f in found if "512" in f or f in ("X86_V4",)]
    paths = {}
    if wide:
        paths["without AVX-512"] = " ".join(wide)
    if len(found) > len(wide):
        paths["baseline only"] = " ".join(found)
    return paths


def _digest_in_subprocess(disabled: str) -> str:
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled}
    code = "import test_samplers_portable as t; print(t.schedule_digest())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_schedules_are_bit_identical_on_every_numpy_simd_path():
    paths = _numpy_paths()
    if not paths:
        pytest.skip("numpy has no SIMD path above its baseline on this CPU")
    here = schedule_digest()
    for label, disabled in paths.items():
        assert _digest_in_subprocess(disabled) == here, f"{label} (NPY_DISABLE_CPU_FEATURES={disabled!r})"


def test_schedules_equal_the_committed_digest():
    assert schedule_digest() == GOLDEN_DIGEST


@pytest.mark.usefixtures("correctly_rounded_reference")
@pytest.mark.parametrize("name", sorted(DIFFUSERS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_schedule_arrays_equal_diffusers_bit_for_bit(name, config):
    """With correctly rounded elementary functions on both sides (tests/reference_math.py), every array the two
    share is the same to the last bit: what is left between them is the step formulas, not the schedule."""
    for steps in STEPS:
        ours, theirs = make_sampler(name, CONFIGS[config], steps), diffusers_scheduler(name, CONFIGS[config], steps)
        shared = [a for a in ("timesteps", "sigmas", "alphas_cumprod") if hasattr(ours, a) and hasattr(theirs, a)]
        assert "timesteps" in shared
        for attr in shared:
            want = getattr(theirs, attr).numpy()
            got = np.asarray(getattr(ours, attr)).astype(want.dtype)
            assert got.shape == want.shape and np.array_equal(got, want), (attr, steps)


REAL = {  # the schedules Stable Diffusion models ship with (SD 1.x, SD 2.x v-prediction, zero-SNR fine-tunes)
    "sd15": SD15,
    "sd2-v": {**SD15, "prediction_type": "v_prediction"},
    "zero-snr-v": {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                   "prediction_type": "v_prediction"},
}
# How far the reference's numbers may sit from correctly rounded ones, in float32 ulps of sigma: its sigmas carry
# one from MKL's sqrt and one from Karras' interpolation between its (so affected) ends; its log-sigma table is
# numpy's float32 log of them, up to two ulps of |log sigma| <= 4 more. Doubled: the query and the table both move.
ULPS = 8
# (steps, index) -> timestep, where a fractional timestep lies within that error of x.5 (SD 1.x and 2.x share the
# schedule). There sdrt decides as correctly rounded arithmetic does, and so does diffusers on the CPUs seen; on
# another CPU diffusers' own rounding could give t + 1. Only the U-Net's timestep input would differ by 1: the
# sigmas the step uses are the same.
CLOSE_CALLS = {"sd15": {(117, 13): 915, (134, 71): 366}, "sd2-v": {(117, 13): 915, (134, 71): 366},
               "zero-snr-v": {}}


def _karras_timesteps(config: dict, steps: int, scale: float = 1.0) -> np.ndarray:
    bar = training_alphas_cumprod(SchedulerConfig.from_dict(config))
    train = np.sqrt((1 - bar) / bar)
    sigmas = karras_sigmas(float(train[0]), float(train[-1]), steps)
    return sigma_to_t(sigmas * scale, fmath.log(train))


@pytest.mark.parametrize("config", sorted(REAL))
def test_real_configurations_round_karras_timesteps_clear_of_a_half(config):
    """DPM++ Karras rounds each sigma's fractional timestep to an integer. A reference whose sigmas are off by up
    to ULPS float32 ulps moves that timestep by at most |t(sigma (1 + ULPS 2^-23)) - t(sigma)|; for every step
    count 1-150 the fractional part stays farther than that from .5, so no CPU's rounding can flip the integer,
    except at the close calls listed, which are pinned below."""
    close = {}
    for steps in range(1, 151):
        t = _karras_timesteps(REAL[config], steps)
        moved = np.abs(_karras_timesteps(REAL[config], steps, 1 + ULPS * 2.0**-23) - t)
        for i in np.flatnonzero(np.abs(t % 1 - 0.5) <= moved):
            close[(steps, int(i))] = int(np.round(t[i]))
    assert close == CLOSE_CALLS[config]


@pytest.mark.usefixtures("correctly_rounded_reference")
@pytest.mark.parametrize("config", sorted(REAL))
def test_close_calls_are_decided_as_correctly_rounded_diffusers_decides_them(config):
    for (steps, i), t in CLOSE_CALLS[config].items():
        ours = make_sampler("dpmpp_2m_karras", REAL[config], steps)
        theirs = diffusers_scheduler("dpmpp_2m_karras", REAL[config], steps)
        assert ours.timesteps[i] == theirs.timesteps[i].item() == t
        assert abs(_karras_timesteps(REAL[config], steps)[i] - (t + 0.5)) < 3e-4  # truly a close call
