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

# Compared with diffusers computing in its own precision and order, with correctly rounded elementary
# functions: otherwise the reference moves between CPUs (tests/reference_math.py).
pytestmark = pytest.mark.usefixtures("correctly_rounded_reference")

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
DIFFUSERS = {name: cls.diffusers_class for name, cls in SAMPLERS.items()}


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth, deterministic stand-in for the U-Net: depends on both the sample and the timestep."""
    return (0.8 * np.tanh(x) * np.cos(t / 150.0) + 0.1 * np.sin(3 * x)).astype(np.float32)


class RecordingNoise:
    """The request's generator, keeping every draw so diffusers can be handed the very same noise."""

    def __init__(self, seed: int = 0):
        self.gen, self.draws = np.random.default_rng(seed), []

    def standard_normal(self, shape, dtype=np.float32):
        self.draws.append(self.gen.standard_normal(shape, dtype=dtype))
        return self.draws[-1]


def run_ours(name, config, steps, x, start=0, noise=None, **options):
    s = make_sampler(name, config, steps, **options)
    x = x * np.float32(s.init_noise_sigma) if start == 0 else x
    noise = noise or RecordingNoise()
    for i in range(start, len(s.timesteps)):
        x = s.step(fake_model(s.scale_model_input(x, i), s.timesteps[i]), i, x, noise)
    return x


def diffusers_scheduler(name, config, steps):
    import diffusers

    cls = SAMPLERS[name]
    sched = getattr(diffusers, cls.diffusers_class).from_config({**config, **cls.diffusers_config})
    sched.set_timesteps(steps)
    return sched


def replay(monkeypatch, name, draws):
    """Make diffusers' scheduler draw `draws` in order instead of torch noise."""
    import importlib

    module = importlib.import_module(type(diffusers_scheduler(name, {}, 1)).__module__)
    queue = list(draws)
    if hasattr(module, "randn_tensor"):  # deterministic schedulers have none to replace
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(queue.pop(0)).reshape(shape))
    return queue


def run_diffusers(name, config, steps, x, start=0, **step_kwargs):
    sched = diffusers_scheduler(name, config, steps)
    x = torch.from_numpy(x)
    if start == 0:
        x = x * sched.init_noise_sigma
    if hasattr(sched, "set_begin_index"):
        # Without it diffusers finds its place by timestep value, and runs off the end when Karras sigmas
        # round two steps to the same timestep (DPM++ Karras on a cosine schedule); we step by index.
        sched.set_begin_index(start)
    for t in sched.timesteps[start:]:
        eps = torch.from_numpy(fake_model(sched.scale_model_input(x, t).numpy(), float(t)))
        x = sched.step(eps, t, x, **step_kwargs).prev_sample
    return x.numpy()


def relative_error(ours, theirs):
    return np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-6)




@pytest.mark.parametrize("name", sorted(DIFFUSERS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_matches_diffusers_over_a_whole_schedule(monkeypatch, name, config, steps):
    """Stochastic samplers too: diffusers is handed the noise our sampler drew from the request's generator."""
    x = np.random.default_rng(steps).standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = RecordingNoise(steps)
    ours = run_ours(name, CONFIGS[config], steps, x, noise=noise)
    left = replay(monkeypatch, name, noise.draws)
    theirs = run_diffusers(name, CONFIGS[config], steps, x)
    assert not left, "diffusers drew less noise than we did"
    assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_timesteps_and_init_sigma_match_diffusers(name, config):
    sched = diffusers_scheduler(name, CONFIGS[config], 20)
    ours = make_sampler(name, CONFIGS[config], 20)
    np.testing.assert_allclose(ours.timesteps, sched.timesteps.numpy().astype(np.float64), rtol=0, atol=1e-3)
    assert ours.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)
    assert ours.order == sched.order


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
@pytest.mark.parametrize("steps,strength", [(10, 0.75), (20, 0.3), (7, 0.5), (50, 0.99), (3, 0.2), (8, 1.0)])
def test_part_way_start_is_diffusers_img2img_arithmetic(name, steps, strength):
    """get_timesteps in StableDiffusionImg2ImgPipeline, spelled out: the same start and the same timesteps."""
    sched = diffusers_scheduler(name, SD15, steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    ours = make_sampler(name, SD15, steps)
    start = ours.start_index(strength)
    assert start == t_start * sched.order
    np.testing.assert_allclose(ours.timesteps[start:], sched.timesteps[t_start * sched.order:].numpy(), atol=1e-3)


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
@pytest.mark.parametrize("config", ["sd15", "sd2-v-trailing"])
def test_part_way_run_matches_diffusers(monkeypatch, name, config):
    """img2img's inner loop: noise clean latents to the start step, then run the rest of the schedule."""
    if name.startswith("lms"):
        pytest.skip("diffusers' LMS takes its order from the step index; ours counts this run's derivatives "
                    "(see lms.py and test_lms_part_way_start_is_first_order)")
    steps, strength = 10, 0.6
    rng = np.random.default_rng(4)
    x0, first = rng.standard_normal((2, 4, 8, 8), dtype=np.float32), rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    sampler = make_sampler(name, CONFIGS[config], steps)
    start = sampler.start_index(strength)
    sched = diffusers_scheduler(name, CONFIGS[config], steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)  # as get_timesteps does before img2img noises its latents
    noised = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(first), sched.timesteps[start:start + 1]).numpy()
    np.testing.assert_allclose(sampler.add_noise(x0, first, start), noised, rtol=1e-5, atol=1e-5)
    noise = RecordingNoise(1)
    ours = run_ours(name, CONFIGS[config], steps, noised, start=start, noise=noise)
    replay(monkeypatch, name, noise.draws)
    theirs = run_diffusers(name, CONFIGS[config], steps, noised, start=start)
    assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name", ["lms", "lms_karras"])
def test_lms_part_way_start_is_first_order(name):
    """A run that starts at step i has one derivative: its first step is an Euler step, later ones build up the
    order as a run from the start does (k-diffusion `sample_lms` on the truncated sigmas)."""
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    lms = make_sampler(name, SD15, 10)
    eps = fake_model(x, lms.timesteps[4])
    x0 = x - lms.sigmas[4] * eps
    euler_step = x + (x - x0) / lms.sigmas[4] * (lms.sigmas[5] - lms.sigmas[4])
    np.testing.assert_allclose(lms.step(eps, 4, x, None), euler_step, rtol=1e-5, atol=1e-6)
    assert len(lms.derivatives) == 1


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_add_noise_matches_diffusers(name):
    sched = diffusers_scheduler(name, SD15, 10)
    ours = make_sampler(name, SD15, 10)
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 3, 4, 4), dtype=np.float32), rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
    for i in (0, 3, 9):
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(i)
        t = sched.timesteps[i : i + 1]
        want = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        np.testing.assert_allclose(ours.add_noise(x0, noise, i), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("config", ["sd15", "sd2-v-trailing"])
def test_stochastic_ddim_matches_diffusers_given_the_same_noise(monkeypatch, eta, config):
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = RecordingNoise(3)
    ours = run_ours("ddim", CONFIGS[config], 9, x, noise=noise, eta=eta)
    assert len(noise.draws) == 9
    replay(monkeypatch, "ddim", noise.draws)
    assert relative_error(ours, run_diffusers("ddim", CONFIGS[config], 9, x, eta=eta)) <= 1e-5


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
    s = make_sampler("ddim", SD15, 10, eta=1.0)
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
    assert str(e.value) == (
        "unknown sampler 'Euler b'; known samplers: ddim (DDIM), pndm (PLMS), lms (LMS), lms_karras (LMS Karras), "
        "euler (Euler), euler_a (Euler a), heun (Heun), dpmpp_2m (DPM++ 2M), dpmpp_2m_karras (DPM++ 2M Karras), "
        "dpmpp_2m_sde_karras (DPM++ 2M SDE Karras), unipc (UniPC), lcm (LCM)")
    assert sampler_names() == list(SAMPLERS)


def test_unusable_scheduler_configs_are_refused():
    with pytest.raises(InvalidRequest, match="timestep_spacing 'sideways'"):
        make_sampler("euler", {"timestep_spacing": "sideways"}, 10)
    with pytest.raises(InvalidRequest, match="thresholding"):
        make_sampler("ddim", {"thresholding": True}, 10)
    with pytest.raises(InvalidRequest, match="beta_schedule 'wobbly'"):
        make_sampler("ddim", {"beta_schedule": "wobbly"}, 10)


def test_euler_ancestral_noise_has_the_formula_std_and_comes_from_the_generator():
    """x = 0 and eps = 0 make x0 = 0, so one step leaves only sigma_up * z."""
    s = make_sampler("euler_a", SD15, 10)
    x = np.zeros((1, 4, 64, 64), np.float32)
    a, b = s.step(x, 3, x, np.random.default_rng(5)), s.step(x, 3, x, np.random.default_rng(5))
    c = s.step(x, 3, x, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    sigma, sigma_next = float(s.sigmas[3]), float(s.sigmas[4])
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    assert a.std() == pytest.approx(sigma_up, rel=0.03) and abs(a.mean()) < 0.05 * sigma_up


def test_lms_coefficients_are_the_lagrange_integrals():
    """The float32-evaluated Gauss-Kronrod rule still integrates the Lagrange basis: against scipy in float64,
    and the coefficients sum to the step (the basis polynomials sum to 1)."""
    from scipy import integrate

    from sdrt.runtime.samplers.lms import lms_coefficients

    sigmas = np.array([14.61, 11.73, 9.34, 7.38, 5.79])  # sigma_{i-3} .. sigma_i, sigma_{i+1}
    ours = lms_coefficients(sigmas)
    nodes = sigmas[:-1][::-1].astype(np.float32).astype(np.float64)
    for j, c in enumerate(ours):
        others = np.delete(nodes, j)
        exact = integrate.quad(lambda t: np.prod((t - others) / (nodes[j] - others)), nodes[0], np.float32(sigmas[-1]))[0]
        assert c == pytest.approx(exact, rel=1e-5, abs=1e-6)
    assert sum(ours) == pytest.approx(float(np.float32(sigmas[-1])) - float(np.float32(sigmas[-2])), rel=1e-6)
