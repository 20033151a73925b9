"""UniPC and LCM beyond the generic parity tests of test_samplers.py: pinned schedule numbers, UniPC's other
solver settings against diffusers, LCM's step limit and the statistics of the noise LCM adds each step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.errors import InvalidRequest
from sdrt.runtime.samplers import make_sampler, resolve
from sdrt.runtime.samplers.unipc import UniPC
from test_samplers import SD15, fake_model, relative_error

# Compared with diffusers computing in its own precision and order, with correctly rounded elementary
# functions: otherwise the reference moves between CPUs (tests/reference_math.py).
pytestmark = pytest.mark.usefixtures("correctly_rounded_reference")


def test_golden_numbers_of_the_sd15_schedule():
    unipc = make_sampler("unipc", SD15, 20)  # UniPC's default spacing is linspace over steps + 1 points
    assert unipc.timesteps[:3].tolist() == [999.0, 949.0, 899.0] and unipc.timesteps[-1] == 50.0
    assert unipc.sigmas[0] == pytest.approx(14.614647, rel=1e-6)
    assert unipc.sigmas[1] == pytest.approx(10.90424, rel=1e-5)
    assert unipc.sigmas[-1] == 0 and unipc.init_noise_sigma == 1.0
    leading = make_sampler("unipc", {**SD15, "timestep_spacing": "leading"}, 20)
    assert leading.timesteps[:3].tolist() == [941.0, 894.0, 847.0] and leading.timesteps[-1] == 48.0
    lcm = make_sampler("lcm", SD15, 4)  # the published 4-step LCM schedule
    assert lcm.timesteps.tolist() == [999.0, 759.0, 499.0, 259.0]
    c_skip, c_out = lcm.boundary_scalings(19)
    assert c_skip == pytest.approx(6.92516e-06, rel=1e-5) and c_out == pytest.approx(0.99999654, rel=1e-7)
    assert make_sampler("lcm", SD15, 50).timesteps[-1] == 19.0
    assert make_sampler("lcm", SD15, 1).timesteps.tolist() == [999.0]


def test_lcm_timesteps_ignore_spacing_and_offset():
    """diffusers' LCMScheduler spaces over its distillation schedule whatever timestep_spacing says."""
    base = make_sampler("lcm", SD15, 6).timesteps
    for spacing in ("leading", "linspace", "trailing"):
        np.testing.assert_array_equal(make_sampler("lcm", {**SD15, "timestep_spacing": spacing}, 6).timesteps, base)


def test_lcm_refuses_more_steps_than_its_distillation_schedule():
    import diffusers

    with pytest.raises(InvalidRequest, match="LCM takes at most 50 steps"):
        make_sampler("lcm", SD15, 51)
    with pytest.raises(ValueError):  # diffusers refuses too
        diffusers.LCMScheduler.from_config(SD15).set_timesteps(51)
    assert len(make_sampler("lcm", {**SD15, "original_inference_steps": 100}, 51).timesteps) == 51
    with pytest.raises(InvalidRequest, match="original_inference_steps 2000"):
        make_sampler("lcm", {**SD15, "original_inference_steps": 2000}, 4)


def test_lcm_noise_comes_from_the_generator_and_has_the_formula_std():
    """x = 0 and eps = 0 make the denoised estimate 0, so a step returns exactly sqrt(1 - a_prev) * z."""
    s = make_sampler("lcm", SD15, 4)
    x = np.zeros((1, 4, 64, 64), np.float32)
    a = s.step(x, 1, x, np.random.default_rng(5))
    b = s.step(x, 1, x, np.random.default_rng(5))
    c = s.step(x, 1, x, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    a_prev = s.alphas_cumprod[int(s.timesteps[2])]
    assert a.std() == pytest.approx(float(np.sqrt(1 - a_prev)), rel=0.03)
    assert abs(a.mean()) < 0.03
    assert not s.step(x, 3, x, np.random.default_rng(5)).any(), "the last step adds no noise"


class _Recorder:
    def __init__(self):
        self.gen, self.draws = np.random.default_rng(0), []

    def standard_normal(self, shape, dtype=np.float32):
        self.draws.append(self.gen.standard_normal(shape, dtype=dtype))
        return self.draws[-1]


def test_lcm_draws_once_per_step_but_the_last_with_the_model_output_shape():
    s, rng = make_sampler("lcm", SD15, 5), _Recorder()
    x = np.ones((2, 4, 8, 8), np.float32)
    for i in range(5):
        x = s.step(fake_model(x, s.timesteps[i]), i, x, rng)
    assert [d.shape for d in rng.draws] == [(2, 4, 8, 8)] * 4 and all(d.dtype == np.float32 for d in rng.draws)


def _unipc_variant(settings: dict) -> type[UniPC]:
    return type("UniPCVariant", (UniPC,), {"diffusers_config": {**UniPC.diffusers_config, **settings}})


VARIANTS = {
    # bh1 with a final sigma of 0: diffusers' last step computes -inf * 0 = NaN (we return x0), so sigma_min
    "order3-bh1": {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "order3-corrector-off": {"solver_order": 3, "disable_corrector": [0, 2, 5]},
    "eps-space": {"predict_x0": False, "final_sigmas_type": "sigma_min"},  # eps-space needs a nonzero last sigma
    "no-lower-order-final": {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("config", [SD15, {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}])
def test_unipc_solver_settings_match_diffusers(variant, config):
    """The defining settings are pinned for "unipc", but the solver reads them: each variant against diffusers."""
    import diffusers

    cls, steps = _unipc_variant(VARIANTS[variant]), 9
    ours = cls(config, steps)
    sched = diffusers.UniPCMultistepScheduler.from_config({**config, **cls.diffusers_config})
    sched.set_timesteps(steps)
    x = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    mine, theirs = x, torch.from_numpy(x)
    for i, t in enumerate(sched.timesteps):
        mine = ours.step(fake_model(mine, ours.timesteps[i]), i, mine, None)
        theirs = sched.step(torch.from_numpy(fake_model(theirs.numpy(), float(t))), t, theirs).prev_sample
    assert np.isfinite(mine).all() and relative_error(mine, theirs.numpy()) <= 1e-5


def test_unipc_bh1_ends_on_the_x0_estimate_where_diffusers_gives_nan():
    s, x = _unipc_variant({"solver_type": "bh1"})(SD15, 4), np.ones((1, 4, 4, 4), np.float32)
    for i in range(4):
        x = s.step(fake_model(x, s.timesteps[i]), i, x, None)
    assert np.isfinite(x).all()


def test_unipc_state_belongs_to_the_request():
    """Two interleaved requests give what each gives alone (multistep history is per sampler instance)."""
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    alone, s = x, make_sampler("unipc", SD15, 6)
    for i in range(6):
        alone = s.step(fake_model(alone, s.timesteps[i]), i, alone, None)
    a, b = make_sampler("unipc", SD15, 6), make_sampler("unipc", SD15, 6)
    xa, xb = x, -x
    for i in range(6):
        xa = a.step(fake_model(xa, a.timesteps[i]), i, xa, None)
        xb = b.step(fake_model(xb, b.timesteps[i]), i, xb, None)
    np.testing.assert_array_equal(xa, alone)


@pytest.mark.parametrize("alias,name", [("UniPC", "unipc"), ("UniPCMultistepScheduler", "unipc"),
                                        ("LCM", "lcm"), ("LCMScheduler", "lcm")])
def test_names_resolve(alias, name):
    assert resolve(alias).name == name
    assert resolve(name).stochastic == (name == "lcm")
