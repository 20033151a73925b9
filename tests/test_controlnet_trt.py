"""ControlNet's TensorRT path on the CPU: the engines' static shapes, their identities in the engine store, and
the refusals on a machine without TensorRT (as test_engine_store.py and test_gpu_path_cpu.py for the rest)."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_engine_store import H100, TRT, fake_manifest

import sdrt
from sdrt.errors import EngineNotBuilt, InvalidRequest, MissingDependency
from sdrt.export.controlnet_unet import residual_layout
from sdrt.runtime import names
from sdrt.runtime.controlnet import ControlNetManifest
from sdrt.runtime.engines.store import EngineStore, onnx_digests
from sdrt.runtime.engines.trt_profiles import controlnet_specs, engine_specs
from sdrt.runtime.manifest import GraphSpec, TensorSpec

SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}


def _residuals():
    return residual_layout(SD15_UNET)


def with_controlnet_unet(manifest):
    """fake_manifest's SD 1.5 bundle as exported now: plus unet-controlnet and its residual inputs."""
    t = lambda n, *shape: TensorSpec(n, "float32", shape)  # noqa: E731
    unet = manifest.graphs[names.UNET]
    inputs = unet.inputs + tuple(t(r["name"], "batch", r["channels"], f"residual_height_{r['level']}",
                                   f"residual_width_{r['level']}") for r in _residuals())
    manifest.graphs[names.UNET_CONTROLNET] = GraphSpec(f"unet/{names.CONTROLNET_MODEL_FILE}", inputs, unet.outputs)
    manifest.cpu_graphs[names.UNET_CONTROLNET] = f"unet/{names.CONTROLNET_CPU_MODEL_FILE}"
    manifest.files |= {f"unet/{names.CONTROLNET_MODEL_FILE}": "c" * 64, f"unet/{names.CONTROLNET_CPU_MODEL_FILE}": "d" * 64}
    manifest.residuals = _residuals()
    return manifest


def fake_controlnet() -> ControlNetManifest:
    t = lambda n, *shape: TensorSpec(n, "float32", shape)  # noqa: E731
    inputs = (t(names.SAMPLE, "batch", 4, "height", "width"), t(names.TIMESTEP, "batch"),
              t(names.ENCODER_HIDDEN_STATES, "batch", "tokens", 768),
              t(names.CONTROLNET_COND, "batch", 3, "image_height", "image_width"))
    return ControlNetManifest(name="control_v11p_sd15_canny", base_family="sd", text_width=768, in_channels=4,
                              image_scale=8, residuals=_residuals(),
                              graphs={names.CONTROLNET: GraphSpec("controlnet/model.onnx", inputs, ())},
                              files={"controlnet/model.onnx": "1" * 64, "controlnet/model.onnx_data": "2" * 64},
                              source_hash="cd" * 32)


def test_the_residual_unet_engine_takes_diffusers_residual_shapes():
    specs = {s.component: s for s in engine_specs(with_controlnet_unet(fake_manifest()), [512], controlnet=True)}
    spec = specs[names.UNET_CONTROLNET]
    assert spec.key == "unet-controlnet-512x512-b2-t77-fp16"
    shapes = spec.input_shapes
    assert shapes[names.SAMPLE] == (2, 4, 64, 64) and shapes[names.ENCODER_HIDDEN_STATES] == (2, 77, 768)
    down = [shapes[names.down_residual(i)] for i in range(12)]
    assert down == [(2, 320, 64, 64)] * 3 + [(2, 320, 32, 32)] + [(2, 640, 32, 32)] * 2 + [(2, 640, 16, 16)] + \
        [(2, 1280, 16, 16)] * 2 + [(2, 1280, 8, 8)] * 3  # the reference table: 6,717,440 elements per sample
    assert shapes[names.MID_RESIDUAL] == (2, 1280, 8, 8)
    assert sum(s[1] * s[2] * s[3] for s in [*down, shapes[names.MID_RESIDUAL]]) == 6_717_440
    odd = {s.component: s for s in engine_specs(with_controlnet_unet(fake_manifest()), [(520, 776)], controlnet=True)}
    assert odd[names.UNET_CONTROLNET].input_shapes[names.MID_RESIDUAL] == (2, 1280, 9, 13)  # 65x97 -> ceil(n/2) x3
    assert names.UNET_CONTROLNET not in {s.component for s in engine_specs(with_controlnet_unet(fake_manifest()), [512])}
    with pytest.raises(InvalidRequest, match="sdrt controlnet prepare BUNDLE"):
        engine_specs(fake_manifest(), [512], controlnet=True)


def test_controlnet_engines_take_the_pipelines_rows_and_the_full_size_image():
    specs = controlnet_specs(fake_controlnet(), fake_manifest(), [512, (768, 640)], batch=2, chunks=2)
    assert [s.key for s in specs] == ["controlnet-512x512-b4-t154-fp16", "controlnet-768x640-b4-t154-fp16"]
    assert specs[1].input_shapes == {names.SAMPLE: (4, 4, 96, 80), names.TIMESTEP: (4,),
                                     names.ENCODER_HIDDEN_STATES: (4, 154, 768), names.CONTROLNET_COND: (4, 3, 768, 640)}


def test_engine_identities_adding_the_residual_unet_leaves_the_unets_engines_valid(tmp_path):
    before = fake_manifest()
    after = with_controlnet_unet(fake_manifest())
    assert onnx_digests(after, names.UNET) == onnx_digests(before, names.UNET)
    own = onnx_digests(after, names.UNET_CONTROLNET)
    assert set(own) == {f"unet/{names.CONTROLNET_MODEL_FILE}", f"unet/{names.CONTROLNET_CPU_MODEL_FILE}",
                        "unet/model.onnx", "unet/model.onnx_data"}  # the weights it reads, and its own graphs
    cn = fake_controlnet()
    store = EngineStore(tmp_path, Path("/bundles/canny"), cn, H100, TRT)
    assert store.dir.parent.name == "cd" * 8  # the ControlNet bundle's own hash, not the model's
    assert dict(store.identity(controlnet_specs(cn, after, [512])[0]).onnx) == cn.files


def test_without_tensorrt_controlnets_open_on_onnx_runtime_or_say_why(models, bundles, tmp_path):
    from controlnet_models import build_controlnet

    from sdrt.export import export_controlnet
    from sdrt.export.build import build_engines

    net_dir = tmp_path / "cn"
    export_controlnet(build_controlnet(models["sd1"], tmp_path / "src", seed=1), net_dir, height=64, width=64,
                      log=lambda *_: None)
    assert sdrt.ControlNet.load(net_dir).backend == "onnxruntime"  # auto, on a machine without TensorRT
    with pytest.raises((MissingDependency, EngineNotBuilt)):
        sdrt.ControlNet.load(net_dir, backend="tensorrt")
    with pytest.raises(MissingDependency):
        build_engines(bundles["sd1"], controlnets=[net_dir])
    pipe = sdrt.Pipeline.load(bundles["sd1"])
    pipe.backend = "tensorrt"  # as a pipeline whose engines were built without --controlnet
    with pytest.raises(EngineNotBuilt, match=r"sdrt build .* --controlnet CN_BUNDLE"):
        pipe._controlled_unet()
