"""The model-family seam: a family defined here, in the test, whose U-Net takes one input more than SD's
(`eps_scale` (B,), multiplying its output). It is exported, checked, opened, generated from and given TensorRT
engine shapes with no code of sdrt's changed: only the two family classes below, one per side, registered.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SD1_CPU_GRAPH, pixels

from sdrt.errors import UnsupportedBundleVersion
from sdrt.export import families as export_families
from sdrt.runtime import families as runtime_families
from sdrt.runtime import names

FAMILY = "sd-scaled"
EXTRA = "eps_scale"
PIPELINE_CLASS = "ScaledStableDiffusionPipeline"  # in model_index.json: how the exporter tells the family


def _scaled_unet(unet):
    import torch

    class ScaledUNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, eps_scale):
            out = self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]
            return out * eps_scale[:, None, None, None]

    return ScaledUNet(unet)


class ScaledExport(export_families.SD):
    name = FAMILY

    def claims(self, src):
        index = src / "model_index.json"
        return index.is_file() and json.loads(index.read_text())["_class_name"] == PIPELINE_CLASS

    def components(self, source):
        import torch

        out = super().components(source)
        u = out[names.UNET]
        out[names.UNET] = export_families.Traced(
            _scaled_unet(source.unet), (*u.inputs, torch.tensor([1.0, 1.0])), [*u.input_names, EXTRA],
            u.output_names, {**u.dynamic_axes, EXTRA: {0: "batch"}})
        return out

    def check_inputs(self, source, component, height, width, ids):
        feeds = super().check_inputs(source, component, height, width, ids)
        return {**feeds, EXTRA: np.array([0.7], np.float32)} if component == names.UNET else feeds

    def settings(self, source):
        return {EXTRA: 1.0}


class ScaledRuntime(runtime_families.SD):
    name = FAMILY

    def conditioning(self, pipe, job):
        cond = super().conditioning(pipe, job)
        rows = len(cond[names.ENCODER_HIDDEN_STATES])
        return {**cond, EXTRA: np.full(rows, pipe.manifest.family_settings[EXTRA], np.float32)}

    def input_shapes(self, manifest, component, rows, height, width, tokens):
        shapes = super().input_shapes(manifest, component, rows, height, width, tokens)
        return {**shapes, EXTRA: (rows,)} if component == names.UNET else shapes


@pytest.fixture(scope="module")
def scaled(models, tmp_path_factory):
    """The SD1 test model declared as the scaled family, exported as conftest exports SD1."""
    from sdrt.export import export_bundle

    root = tmp_path_factory.mktemp("scaled")
    src = shutil.copytree(models["sd1"], root / "model")
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "_class_name": PIPELINE_CLASS}))
    exporter, runtime = export_families.register(ScaledExport()), runtime_families.register(ScaledRuntime())
    try:
        export_bundle(src, root / "bundle", log=lambda *_: None, **SD1_CPU_GRAPH)
        yield root / "bundle"
    finally:
        export_families.unregister(exporter)
        runtime_families.unregister(runtime.name)


def test_the_manifest_names_the_family_and_the_unet_takes_its_input(scaled, bundles):
    from sdrt.runtime.manifest import load_manifest

    m = load_manifest(scaled)
    assert (m.family, m.family_settings) == (FAMILY, {EXTRA: 1.0})
    assert [t.name for t in m.graphs[names.UNET].inputs] == [names.SAMPLE, names.TIMESTEP,
                                                            names.ENCODER_HIDDEN_STATES, EXTRA]
    assert names.UNET in m.cpu_graphs  # the CPU graph's passes retraced the family's own U-Net module
    raw = json.loads((bundles["sd1"] / names.MANIFEST_FILE).read_text())
    assert "family" not in raw and "family_settings" not in raw  # SD bundles read as before families
    assert load_manifest(bundles["sd1"]).family == "sd"


def test_the_pipeline_feeds_the_family_conditioning_unread(scaled, pipes, monkeypatch):
    import sdrt
    from conftest import latents

    pipe = sdrt.Pipeline.load(scaled)
    unet, fed = pipe.engines[names.UNET], []

    class Recording:  # the real engine, its feeds kept
        inputs, outputs = unet.inputs, unet.outputs

        def __call__(self, **feeds):
            fed.append({k: np.array(v) for k, v in feeds.items()})
            return unet(**feeds)

    monkeypatch.setitem(pipe.engines, names.UNET, Recording())
    x = latents(2)
    ours = pipe.txt2img("a red circle", latents=x, batch=2, steps=3, guidance=7.5, sampler="euler")
    plain = pipes["sd1"].txt2img("a red circle", latents=x, batch=2, steps=3, guidance=7.5, sampler="euler")
    assert np.array_equal(pixels(ours), pixels(plain))  # eps_scale 1: SD's images, bit for bit
    assert len(fed) == 3 and all(set(f) == {names.SAMPLE, names.TIMESTEP, names.ENCODER_HIDDEN_STATES, EXTRA}
                                 for f in fed)
    assert all(np.array_equal(f[EXTRA], np.ones(4, np.float32)) for f in fed)  # [uncond; cond] x batch 2
    f = fed[0]
    half = unet(**{**f, EXTRA: np.full(4, 0.5, np.float32)})[names.OUT_SAMPLE]
    np.testing.assert_allclose(half, 0.5 * unet(**f)[names.OUT_SAMPLE], rtol=1e-6, atol=1e-7)

    monkeypatch.setitem(pipe.manifest.family_settings, EXTRA, 0.5)  # the family reads its own settings
    fed.clear()
    pipe.txt2img("a red circle", latents=x, batch=2, steps=1, guidance=1.0)
    assert np.array_equal(fed[0][EXTRA], np.full(2, 0.5, np.float32))  # no guidance: B rows


def test_tensorrt_profiles_give_the_extra_input_its_shape(scaled):
    from sdrt.runtime.engines.trt_profiles import engine_specs, fit
    from sdrt.runtime.manifest import load_manifest

    specs = {s.component: s for s in engine_specs(load_manifest(scaled), [(64, 96)], batch=2)}
    unet = specs[names.UNET].input_shapes
    assert unet == {names.SAMPLE: (4, 4, 8, 12), names.TIMESTEP: (4,), names.ENCODER_HIDDEN_STATES: (4, 77, 32),
                    EXTRA: (4,)}
    guidance_off = {names.SAMPLE: (2, 4, 8, 12), names.TIMESTEP: (2,), names.ENCODER_HIDDEN_STATES: (2, 77, 32),
                    EXTRA: (2,)}
    assert fit(unet, guidance_off) == 2  # padded with zero rows, as SD's inputs are


def test_a_bundle_of_an_unknown_family_is_refused_by_name(scaled):
    from sdrt.runtime.manifest import load_manifest

    runtime_families.unregister(FAMILY)
    try:
        with pytest.raises(UnsupportedBundleVersion, match="is of model family 'sd-scaled', which this sdrt does "
                                                           "not run \\(it runs sd\\)"):
            load_manifest(scaled)
    finally:
        runtime_families.register(ScaledRuntime())
