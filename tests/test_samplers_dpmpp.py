"""DPM++ 2M (plain, Karras, SDE Karras) beyond the shared parity tests of test_samplers.py: golden schedule
numbers, the scheduler options a bundle's config may carry, edge cases, and the SDE noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.errors import InvalidRequest
from sdrt.runtime.samplers import make_sampler, resolve
from test_samplers import (CONFIGS, SD15, RecordingNoise, diffusers_scheduler, fake_model, relative_error, replay,
                           run_ours)

# Compared with diffusers computing in its own precision and order, with correctly rounded elementary
# functions: otherwise the reference moves between CPUs (tests/reference_math.py).
pytestmark = pytest.mark.usefixtures("correctly_rounded_reference")

NAMES = ("dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras")


def test_golden_numbers_of_the_sd15_schedule():
    """Values diffusers 0.42 gives for SD 1.5's config at 20 steps (Karras: k-diffusion's familiar ladder)."""
    karras = make_sampler("dpmpp_2m_karras", SD15, 20)
    np.testing.assert_allclose(karras.sigmas[:3], [14.614647, 11.725372, 9.340212], rtol=1e-6)
    assert karras.sigmas[-2] == pytest.approx(0.0291675, rel=1e-5) and karras.sigmas[-1] == 0
    assert karras.timesteps[:4].tolist() == [999, 962, 921, 876] and karras.timesteps[-3:].tolist() == [6, 2, 0]
    plain = make_sampler("dpmpp_2m", SD15, 20)  # linspace over steps + 1 points, the last dropped: ends at 50
    assert plain.timesteps[:3].tolist() == [999, 949, 899] and plain.timesteps[-1] == 50
    np.testing.assert_allclose(plain.sigmas[[0, 1, -2]], [14.614647, 10.904240, 0.2255826], rtol=1e-6)
    assert plain.init_noise_sigma == 1.0 and plain.order == 1
    x = np.ones((1, 4, 2, 2), np.float32)
    assert plain.scale_model_input(x, 3) is x
    # One "leading" step starts at t = 501 (sigma 1.62), far from pure noise: diffusers' arithmetic, kept.
    assert make_sampler("dpmpp_2m", {**SD15, "timestep_spacing": "leading"}, 1).timesteps.tolist() == [501]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("config", ["sd15", "sd2-v-trailing"])
def test_one_step_lands_on_the_denoised_estimate(name, config):
    """A single step is first order down to sigma 0: x0 itself (the SDE's noise term has coefficient 0)."""
    s = make_sampler(name, CONFIGS[config], 1)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    out = fake_model(x, s.timesteps[0])
    noise = RecordingNoise(0)
    got = s.step(out, 0, x, noise)
    alpha = 1 / np.sqrt(np.float64(s.sigmas[0]) ** 2 + 1)
    sigma = s.sigmas[0] * alpha
    want = (x - sigma * out) / alpha if config == "sd15" else alpha * x - sigma * out
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(noise.draws) == (1 if s.stochastic else 0)


def run_diffusers_by_index(monkeypatch, name, config, steps, x, draws):
    """diffusers with set_begin_index(0): stepped by index, as ours, even where a timestep repeats."""
    left = replay(monkeypatch, name, draws)
    sched, xt = diffusers_scheduler(name, config, steps), torch.from_numpy(x)
    sched.set_begin_index(0)
    for t in sched.timesteps:
        xt = sched.step(torch.from_numpy(fake_model(xt.numpy(), float(t))), t, xt).prev_sample
    assert not left, "diffusers drew less noise than we did"
    return xt.numpy()


OPTIONS = {
    "sigma-min-second-order-last": {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    "euler-at-final": {"final_sigmas_type": "sigma_min", "euler_at_final": True},
    "no-lower-order-final": {"lower_order_final": False},
    "lambda-clipped-cosine": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    "lambda-clipped-trailing": {"timestep_spacing": "trailing", "lambda_min_clipped": -2.0},
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("steps", [3, 10, 20])
def test_scheduler_options_match_diffusers(monkeypatch, name, options, steps):
    """Keys a scheduler_config.json saved by DPMSolverMultistepScheduler carries, read as diffusers reads them."""
    config = {**SD15, **OPTIONS[options]}
    x = np.random.default_rng(steps).standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = RecordingNoise(steps)
    ours = run_ours(name, config, steps, x, noise=noise)
    theirs = run_diffusers_by_index(monkeypatch, name, config, steps, x, noise.draws)
    assert relative_error(ours, theirs) <= 1e-5
    sched = diffusers_scheduler(name, config, steps)
    np.testing.assert_allclose(make_sampler(name, config, steps).timesteps, sched.timesteps.numpy())


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "dpmpp_2m_sde_karras"])
@pytest.mark.parametrize("steps", [7, 50])
def test_repeated_first_timestep_is_stepped_by_index(monkeypatch, name, steps):
    """Cosine schedule + Karras: the top sigmas all lie between training steps 998 and 999, and diffusers
    truncates cosine timesteps, so t = 998 repeats. Without set_begin_index, diffusers' step() then starts at
    the repeat's second index and runs off the schedule (IndexError), in its txt2img pipeline too. We step
    by index, as diffusers does with set_begin_index(0)."""
    config = CONFIGS["cosine-zero-snr-v"]
    s = make_sampler(name, config, steps)
    assert s.timesteps[0] == s.timesteps[1] == 998
    x = np.random.default_rng(steps).standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = RecordingNoise(steps)
    ours = run_ours(name, config, steps, x, noise=noise)
    assert relative_error(ours, run_diffusers_by_index(monkeypatch, name, config, steps, x, noise.draws)) <= 1e-5


def test_sde_noise_comes_from_the_generator_with_the_formula_std():
    """x = 0 and eps = 0 make the data prediction 0, so a step leaves only sigma_t * sqrt(1 - e^-2h) * z."""
    x = np.zeros((1, 4, 64, 64), np.float32)

    def one_step(seed):
        return make_sampler("dpmpp_2m_sde_karras", SD15, 10).step(x, 3, x, np.random.default_rng(seed))

    a, b, c = one_step(5), one_step(5), one_step(6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    sigmas = make_sampler("dpmpp_2m_sde_karras", SD15, 10).sigmas.astype(np.float64)
    s, s_next = sigmas[3], sigmas[4]  # VE sigmas; lambda = -log(sigma), so h = log(s / s_next)
    h = np.log(s / s_next)
    sigma_t = s_next / np.sqrt(s_next**2 + 1)
    assert a.std() == pytest.approx(sigma_t * np.sqrt(1 - np.exp(-2 * h)), rel=0.03)
    assert abs(a.mean()) < 0.05 * a.std()


def test_bundle_settings_do_not_change_the_sampler():
    """A config saved by another DPM-Solver variant must not turn plain DPM++ 2M into it."""
    saved = {**SD15, "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++", "use_lu_lambdas": True,
             "solver_order": 3, "solver_type": "heun"}
    for name in NAMES:
        np.testing.assert_array_equal(make_sampler(name, saved, 20).sigmas, make_sampler(name, SD15, 20).sigmas)
        assert diffusers_scheduler(name, saved, 20).config.solver_order == 2


def test_unsupported_settings_are_refused():
    with pytest.raises(InvalidRequest, match="variance_type"):
        make_sampler("dpmpp_2m", {**SD15, "variance_type": "learned_range"}, 10)
    with pytest.raises(InvalidRequest, match="final_sigmas_type 'half'"):
        make_sampler("dpmpp_2m_karras", {**SD15, "final_sigmas_type": "half"}, 10)


@pytest.mark.parametrize("alias,name", [("DPM++ 2M", "dpmpp_2m"), ("DPM++ 2M Karras", "dpmpp_2m_karras"),
                                        ("dpm++ 2m sde karras", "dpmpp_2m_sde_karras"),
                                        ("DPMSolverMultistepScheduler", "dpmpp_2m")])
def test_names_resolve(alias, name):
    assert resolve(alias).name == name
