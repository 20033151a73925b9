"""The runtime pipeline: request checks with their exact messages, seeds, NaN guards, PNG parameters."""
from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import latents, pixels
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrt.errors import InvalidRequest, NonFiniteOutput, UnknownSampler
from sdrt.runtime import request
from sdrt.runtime.engines.ort import Engine

GOLDEN_SEED_5 = [-1.2224977, -2.1383154, -0.06472305, -0.70555127]  # default_rng(5).standard_normal(4, float32)

BAD_REQUESTS = [
    ({"steps": 0}, "steps must be a whole number from 1 to 1000, got 0"),
    ({"steps": 2.5}, "steps must be a whole number from 1 to 1000, got 2.5"),
    ({"steps": True}, "steps must be a whole number from 1 to 1000, got True"),
    ({"guidance": -1}, "guidance must be a finite number >= 0 (values <= 1 turn classifier-free guidance off), got -1"),
    ({"guidance": float("nan")}, "guidance must be a finite number >= 0 (values <= 1 turn classifier-free guidance off), got nan"),
    ({"guidance": float("inf")}, "guidance must be a finite number >= 0 (values <= 1 turn classifier-free guidance off), got inf"),
    ({"height": 65}, "height must be a positive multiple of 8, got 65; use 64 or 72"),
    ({"width": 0}, "width must be a positive multiple of 8, got 0"),
    ({"width": -16}, "width must be a positive multiple of 8, got -16"),
    ({"batch": 0}, "batch must be a whole number from 1 to 64, got 0"),
    ({"batch": 65}, "batch must be a whole number from 1 to 64, got 65"),
    ({"seed": -1}, "seed must be a whole number from 0 to 2**64-1 (or None for a random one), got -1"),
    ({"seed": 2**64}, f"seed must be a whole number from 0 to 2**64-1 (or None for a random one), got {2**64}"),
    ({"seed": "7"}, "seed must be a whole number from 0 to 2**64-1 (or None for a random one), got '7'"),
    ({"prompt": None}, "prompt must be a string, got NoneType"),
    ({"prompt": "a\x00b"}, "prompt contains a NUL character; remove it"),
    ({"prompt": "a\ud800b"}, "prompt contains a lone surrogate (invalid unicode); fix its encoding"),
    ({"negative_prompt": 3}, "negative prompt must be a string, got int"),
    ({"sampler": "Euler b"}, "unknown sampler 'Euler b'; known samplers: ddim (DDIM), pndm (PLMS), lms (LMS), "
     "lms_karras (LMS Karras), euler (Euler), euler_a (Euler a), heun (Heun), dpmpp_2m (DPM++ 2M), dpmpp_2m_karras "
     "(DPM++ 2M Karras), dpmpp_2m_sde_karras (DPM++ 2M SDE Karras), unipc (UniPC), lcm (LCM)"),
    ({"sampler": "euler_a", "eta": 0.5}, "sampler 'euler_a' takes no eta; eta applies to ddim"),
    ({"sampler": "ddim", "eta": -0.1}, "eta must be a number from 0 to 1, got -0.1"),
    ({"sampler": "lcm", "steps": 60}, "LCM takes at most 50 steps (its original_inference_steps, the schedule it was "
     "distilled on), got 60; LCM models need only 2 to 8"),
    ({"latents": np.zeros((1, 4, 4, 4), np.float32)},
     "latents have shape (1, 4, 4, 4); this request needs (1, 4, 8, 8) (batch, channels, H/8, W/8)"),
    ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, "latents contain NaN or Inf"),
    ({"latents": np.zeros((1, 4, 8, 8), np.int64)}, "latents must be floating point, got int64"),
]


@pytest.mark.parametrize("change,message", BAD_REQUESTS, ids=[m[:40] for _, m in BAD_REQUESTS])
def test_bad_requests_are_refused_with_a_clear_message(pipes, change, message):
    args = {"prompt": "a red circle", "steps": 2, **change}
    with pytest.raises(InvalidRequest) as e:
        pipes["sd1"].txt2img(**args)
    assert str(e.value) == message


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3)))
def test_checks_accept_exactly_their_ranges(value):
    """Every check either returns a valid value or raises InvalidRequest, never anything else."""
    for check, ok in ((lambda v: request.check_int(v, "steps", 1, 1000), lambda v: 1 <= v <= 1000),
                      (lambda v: request.check_size(v, "height", 8), lambda v: v > 0 and v % 8 == 0),
                      (request.check_seed, lambda v: v is None or 0 <= v < 2**64),
                      (request.check_guidance, lambda v: v >= 0)):
        try:
            result = check(value)
        except InvalidRequest:
            continue
        assert ok(result)


def test_the_same_seed_gives_the_same_image_and_another_seed_another(pipes):
    pipe = pipes["sd1"]
    a, b, c = (pixels(pipe.txt2img("a cat", steps=3, seed=s)) for s in (11, 11, 12))
    assert np.array_equal(a, b) and np.abs(a - c).mean() > 0.01


def test_image_i_of_a_batch_is_the_single_image_of_seed_plus_i(pipes):
    pipe = pipes["sd2"]
    batch = pipe.txt2img("a cat", steps=3, seed=40, batch=3, guidance=3.0)
    single = pipe.txt2img("a cat", steps=3, seed=42, guidance=3.0)
    assert np.abs(pixels(batch[2:]) - pixels(single)).max() <= 1 / 255
    assert [re.search(r"Seed: (\d+)", im.info["parameters"]).group(1) for im in batch] == ["40", "41", "42"]


def test_initial_noise_is_a_seeded_numpy_standard_normal(pipes):
    """Same seed, same noise on any machine: PCG64 through numpy's default_rng, scaled by the initial sigma."""
    from sdrt.runtime.samplers import make_sampler

    pipe = pipes["sd1"]
    noise = np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32)
    a = pixels(pipe.txt2img("a cat", steps=2, seed=5))
    b = pixels(pipe.txt2img("a cat", steps=2, latents=noise))
    assert np.array_equal(a, b)
    assert make_sampler("euler", pipe.scheduler_config, 2).init_noise_sigma > 1


def test_the_noise_stream_is_pinned():
    """Golden values of numpy's PCG64 stream: if a numpy release ever changes it, seeds stop reproducing
    old images, and this says so."""
    noise = request.BatchNoise([5, 6]).standard_normal((2, 4))
    np.testing.assert_allclose(noise[0], GOLDEN_SEED_5, rtol=1e-6)
    assert not np.allclose(noise[1], GOLDEN_SEED_5)


def test_a_random_seed_is_drawn_and_recorded(pipes):
    image = pipes["sd1"].txt2img("a cat", steps=2)[0]
    seed = int(re.search(r"Seed: (\d+)", image.info["parameters"]).group(1))
    again = pipes["sd1"].txt2img("a cat", steps=2, seed=seed)[0]
    assert np.array_equal(np.asarray(image), np.asarray(again))


def test_parameters_follow_a1111s_layout(pipes):
    image = pipes["sd1"].txt2img("a red circle", negative_prompt="blurry", steps=3, guidance=6.5, seed=9,
                                 sampler="DDIMScheduler")[0]
    lines = image.info["parameters"].split("\n")
    assert lines[0] == "a red circle" and lines[1] == "Negative prompt: blurry"
    model_hash = pipes["sd1"].manifest.source_hash[:10]
    assert lines[2] == (f"Steps: 3, Sampler: DDIM, CFG scale: 6.5, Seed: 9, Size: 64x64, Model hash: {model_hash}, "
                        f"Model: sd1, Version: sdrt 0.1.0")


class _Poisoned(Engine):
    """Fault injection (the one place a fake is right): a real engine whose output turns NaN on call `at`."""

    def __init__(self, real: Engine, at: int):
        self.real, self.at, self.calls = real, at, 0
        self.name, self.inputs, self.outputs = real.name, real.inputs, real.outputs

    def _run(self, feeds):
        out = self.real._run(feeds)
        self.calls += 1
        if self.calls == self.at:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out


@pytest.mark.parametrize("component,at,stage,step", [("unet", 3, "U-Net", 2), ("unet", 1, "U-Net", 0),
                                                     ("vae_decoder", 1, "VAE decoder", None),
                                                     ("text_encoder", 1, "text encoder", None)])
def test_non_finite_outputs_raise_instead_of_a_black_image(pipes, monkeypatch, component, at, stage, step):
    pipe = pipes["sd1"]
    monkeypatch.setitem(pipe.engines, component, _Poisoned(pipe.engines[component], at))
    with pytest.raises(NonFiniteOutput) as e:
        pipe.txt2img("a cat", steps=4, seed=1)
    assert (e.value.stage, e.value.step) == (stage, step)
    where = f"{stage} at step {step}" if step is not None else stage
    assert str(e.value).startswith(f"non-finite values (NaN/Inf) in the output of the {where}; the image was not written")


def test_engine_inputs_are_checked_against_the_graph(pipes):
    from sdrt.errors import EngineError

    unet = pipes["sd1"].engines["unet"]
    with pytest.raises(EngineError, match=r"unet: input 'sample' has shape \(4, 8, 8\), the graph expects rank 4"):
        unet(sample=np.zeros((4, 8, 8), np.float32), timestep=np.zeros(1, np.float32),
             encoder_hidden_states=np.zeros((1, 77, 32), np.float32))
    with pytest.raises(EngineError, match="unet: input 'sample' is int64, the graph expects float32"):
        unet(sample=np.zeros((1, 4, 8, 8), np.int64), timestep=np.zeros(1, np.float32),
             encoder_hidden_states=np.zeros((1, 77, 32), np.float32))
    with pytest.raises(EngineError, match=r"input 'encoder_hidden_states' has shape \(1, 77, 16\), the graph expects"):
        unet(sample=np.zeros((1, 4, 8, 8), np.float32), timestep=np.zeros(1, np.float32),
             encoder_hidden_states=np.zeros((1, 77, 16), np.float32))
    with pytest.raises(EngineError, match=r"inputs \['sample'\] do not match the graph's"):
        unet(sample=np.zeros((1, 4, 8, 8), np.float32))


def test_any_multiple_of_8_runs(pipes):
    """The U-Net was traced at an odd latent size, so sizes that are not multiples of 16 work, as in diffusers."""
    image = pipes["sd1"].txt2img("a cat", steps=2, seed=1, height=72, width=40)[0]
    assert image.size == (40, 72)


def test_unknown_sampler_is_also_an_invalid_request():
    assert issubclass(UnknownSampler, InvalidRequest)
