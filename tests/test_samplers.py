"""Each numpy sampler against its diffusers scheduler, driven by the same fake noise predictor.

Pass bar: latents within 1e-5 relative after the whole schedule, for step counts 1, 2, odd and 50, every
timestep spacing, epsilon and v_prediction.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.errors import InvalidRequest, UnknownSampler
from sdrt.runtime.samplers import SAMPLERS, make_sampler, resolve, sampler_names

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
CONFIGS = {
    "sd15": SD15,  # no timestep_spacing: each class's own default applies, as in diffusers
    "sd15-leading": {**SD15, "timestep_spacing": "leading"},
    "sd15-linspace": {**SD15, "timestep_spacing": "linspace"},
    "sd2-v-trailing": {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "linear-clip": {"beta_schedule": "linear", "clip_sample": True},  # DDIM clips x0 here
    "cosine-zero-snr-v": {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True,
                          "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
}
DIFFUSERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth, deterministic stand-in for the U-Net: depends on both the sample and the timestep."""
    return (0.8 * np.tanh(x) * np.cos(t / 150.0) + 0.1 * np.sin(3 * x)).astype(np.float32)


def run_ours(name, config, steps, x):
    s = make_sampler(name, config, steps)
    x = x * np.float32(s.init_noise_sigma)
    for i, t in enumerate(s.timesteps):
        x = s.step(fake_model(s.scale_model_input(x, i), t), i, x, np.random.default_rng(0))
    return x


def run_diffusers(name, config, steps, x):
    import diffusers

    sched = getattr(diffusers, DIFFUSERS[name]).from_config(config)
    sched.set_timesteps(steps)
    x = torch.from_numpy(x) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = torch.from_numpy(fake_model(sched.scale_model_input(x, t).numpy(), float(t)))
        x = sched.step(eps, t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_matches_diffusers_over_a_whole_schedule(name, config, steps):
    x = np.random.default_rng(steps).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ours, theirs = run_ours(name, CONFIGS[config], steps, x), run_diffusers(name, CONFIGS[config], steps, x)
    rel = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-6)
    assert rel <= 1e-5


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_timesteps_and_init_sigma_match_diffusers(name, config):
    import diffusers

    sched = getattr(diffusers, DIFFUSERS[name]).from_config(CONFIGS[config])
    sched.set_timesteps(20)
    ours = make_sampler(name, CONFIGS[config], 20)
    np.testing.assert_allclose(ours.timesteps, sched.timesteps.numpy().astype(np.float64), rtol=0, atol=1e-3)
    assert ours.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_add_noise_matches_diffusers(name):
    import diffusers

    sched = getattr(diffusers, DIFFUSERS[name]).from_config(SD15)
    sched.set_timesteps(10)
    ours = make_sampler(name, SD15, 10)
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 3, 4, 4), dtype=np.float32), rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
    for i in (0, 3, 9):
        t = sched.timesteps[i : i + 1]
        want = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        np.testing.assert_allclose(ours.add_noise(x0, noise, i), want, rtol=1e-5, atol=1e-6)


def test_golden_numbers_of_the_sd15_schedule():
    """Published values (k-diffusion / diffusers, SD 1.5 config) pin the schedule arithmetic."""
    euler = make_sampler("euler", {**SD15, "timestep_spacing": "leading"}, 20)
    assert euler.timesteps[:3].tolist() == [951.0, 901.0, 851.0] and euler.timesteps[-1] == 1.0
    assert euler.sigmas[0] == pytest.approx(11.0283, abs=1e-4)
    assert euler.init_noise_sigma == pytest.approx((11.0283**2 + 1) ** 0.5, abs=1e-3)
    linspace = make_sampler("euler", SD15, 20)  # Euler's default spacing: the sigmas of k-diffusion
    assert linspace.sigmas[0] == pytest.approx(14.614641, rel=1e-5)
    assert linspace.sigmas[1] == pytest.approx(10.7468, rel=1e-3)
    assert linspace.sigmas[-2] == pytest.approx(0.029167, rel=1e-3) and linspace.sigmas[-1] == 0
    ddim = make_sampler("ddim", SD15, 50)
    assert ddim.timesteps[:2].tolist() == [981.0, 961.0] and ddim.timesteps[-1] == 1.0


def test_stochastic_ddim_noise_comes_from_the_generator_and_has_the_formula_variance():
    s = make_sampler("ddim", SD15, 10)
    s.eta = 1.0
    x = np.zeros((1, 4, 64, 64), np.float32)
    eps = np.zeros_like(x)
    a = s.step(eps, 3, x, np.random.default_rng(5))
    b = s.step(eps, 3, x, np.random.default_rng(5))
    c = s.step(eps, 3, x, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    t, prev = int(s.timesteps[3]), int(s.timesteps[3]) - s.stride
    a_t, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[prev]
    expected_std = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    assert a.std() == pytest.approx(expected_std, rel=0.03)


@pytest.mark.parametrize("alias,name", [("euler", "euler"), ("Euler", "euler"), ("EulerDiscreteScheduler", "euler"),
                                        ("DDIM", "ddim"), ("DDIMScheduler", "ddim"), (" ddim ", "ddim")])
def test_names_resolve(alias, name):
    assert resolve(alias).name == name


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(UnknownSampler) as e:
        resolve("Euler b")
    assert str(e.value) == "unknown sampler 'Euler b'; known samplers: euler (Euler), ddim (DDIM)"
    assert sampler_names() == sorted(SAMPLERS)


def test_unusable_scheduler_configs_are_refused():
    with pytest.raises(InvalidRequest, match="timestep_spacing 'sideways'"):
        make_sampler("euler", {"timestep_spacing": "sideways"}, 10)
    with pytest.raises(InvalidRequest, match="thresholding"):
        make_sampler("ddim", {"thresholding": True}, 10)
    with pytest.raises(InvalidRequest, match="beta_schedule 'wobbly'"):
        make_sampler("ddim", {"beta_schedule": "wobbly"}, 10)
