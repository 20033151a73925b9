"""sdrt against diffusers' StableDiffusionPipeline: same weights, same initial latents, same scheduler.

Pass bar: max pixel difference <= 2/255 for every case.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import latents, pixels

from sdrt.runtime.samplers import SAMPLERS

TOLERANCE = 2 / 255
LONG_PROMPT = ", ".join(["a very detailed painting of a lighthouse on a cliff at sunset"] * 8)
CASES = [  # prompt, negative prompt, guidance, batch
    ("a red circle on a blue background", "", 7.5, 1),
    ("a red circle on a blue background", "blurry, low quality", 7.5, 2),
    ("a green triangle", "", 1.0, 1),  # guidance off
    ("a green triangle", "", 0.0, 2),  # guidance off, batch 2
    ("", "", 7.5, 1),  # empty prompt
    (LONG_PROMPT, "", 5.0, 1),  # truncated at 77 tokens with truncate=True, as diffusers does
]


def use_scheduler(ref, sampler: str):
    """Give the diffusers pipeline the scheduler that is `sampler`, built from the model's own config (not from
    the previous test's scheduler, whose config carries its class's settings such as use_karras_sigmas)."""
    import diffusers

    cls = SAMPLERS[sampler]
    original = ref.__dict__.setdefault("_sdrt_original_scheduler_config", dict(ref.scheduler.config))
    ref.scheduler = getattr(diffusers, cls.diffusers_class).from_config({**original, **cls.diffusers_config})
    return importlib.import_module(type(ref.scheduler).__module__)


def reference_images(ref, sampler, prompt, negative, guidance, lat, steps):
    use_scheduler(ref, sampler)
    out = ref(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
              latents=torch.from_numpy(lat), num_images_per_prompt=len(lat), output_type="np").images
    return (out * 255).round() / 255  # diffusers' own uint8 rounding (numpy_to_pil)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
@pytest.mark.parametrize("prompt,negative,guidance,batch", CASES)
def test_images_match_diffusers(pipes, reference, family, sampler, prompt, negative, guidance, batch):
    lat = latents(batch, seed=batch)
    with pytest.warns(UserWarning, match="dropped") if prompt == LONG_PROMPT else _nothing():
        got = pixels(pipes[family].txt2img(prompt, negative_prompt=negative, steps=12, guidance=guidance,
                                           sampler=sampler, latents=lat, batch=batch,
                                           truncate=prompt == LONG_PROMPT))  # diffusers' behaviour
    want = reference_images(reference[family], sampler, prompt, negative, guidance, lat, 12)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_images_have_contrast_and_follow_the_prompt(pipes, family):
    """Guard against a flat-grey model hiding bugs: parity above only means something if this holds."""
    lat = latents(1, seed=7)
    a = pixels(pipes[family].txt2img("a red circle", steps=8, latents=lat))
    b = pixels(pipes[family].txt2img("a blue square on a green background", steps=8, latents=lat))
    assert a.std() > 0.15, "images should not be flat"
    assert np.abs(a - b).mean() > 0.05, "a different prompt should visibly change the image"


def test_guidance_changes_the_image(pipes):
    lat = latents(1, seed=3)
    a = pixels(pipes["sd1"].txt2img("a red circle", steps=6, guidance=1.0, latents=lat))
    b = pixels(pipes["sd1"].txt2img("a red circle", steps=6, guidance=9.0, latents=lat))
    assert np.abs(a - b).mean() > 0.02


class _RecordingBatchNoise:
    """Wraps request.BatchNoise.standard_normal so every draw the sampler makes can be replayed into diffusers."""

    def __init__(self, monkeypatch):
        from sdrt.runtime import request

        self.draws, original = [], request.BatchNoise.standard_normal

        def record(noise, shape, dtype=np.float32):
            self.draws.append(original(noise, shape, dtype))
            return self.draws[-1]

        monkeypatch.setattr(request.BatchNoise, "standard_normal", record)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_matches_diffusers_through_the_pipeline(monkeypatch, pipes, reference, family, sampler):
    """Stochastic samplers too: diffusers is handed, in order, the noise our sampler drew from the seed."""
    cls, lat = SAMPLERS[sampler], latents(2, seed=11)
    noise = _RecordingBatchNoise(monkeypatch)
    got = pixels(pipes[family].txt2img("a red circle on a blue background", negative_prompt="blurry", steps=7,
                                       guidance=6.0, sampler=sampler, latents=lat, batch=2, seed=3))
    ref = reference[family]
    module = use_scheduler(ref, sampler)
    queue = list(noise.draws)
    assert bool(queue) == cls.stochastic
    if queue:
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(queue.pop(0)))
    out = ref("a red circle on a blue background", negative_prompt="blurry", num_inference_steps=7, guidance_scale=6.0,
              latents=torch.from_numpy(lat), num_images_per_prompt=2, output_type="np").images
    assert not queue
    assert np.abs(got - (out * 255).round() / 255).max() <= TOLERANCE


@pytest.mark.parametrize("sampler", [name for name, cls in SAMPLERS.items() if cls.stochastic] + ["ddim-eta"])
def test_stochastic_samplers_are_reproducible_by_seed(pipes, sampler):
    name, eta = ("ddim", 0.8) if sampler == "ddim-eta" else (sampler, None)
    run = lambda seed: pixels(pipes["sd1"].txt2img("a red circle", steps=6, sampler=name, seed=seed, eta=eta))  # noqa: E731
    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01
