"""The GPU path on a machine without one: `sdrt doctor`, the refusal of `sdrt build`, backend choice, the fp16
graph conversion (checked with ONNX Runtime on the CPU), and gpu_check's CPU side."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdrt import doctor as doc
from sdrt.errors import MissingDependency
from sdrt.runtime.engines import cuda

ROOT = Path(__file__).resolve().parents[1]


def _has_gpu_and_trt() -> bool:
    report, _ = doc.doctor()
    return report["can_build"]


@pytest.fixture
def nothing_installed(monkeypatch):
    """This machine as the CI's is: no cuda-python, no nvidia-smi, no TensorRT (made so even where some exist)."""
    def no_cuda_python():
        raise MissingDependency("the GPU path needs cuda-python: " + cuda.INSTALL)
    monkeypatch.setattr(cuda, "runtime", no_cuda_python)
    monkeypatch.setattr(doc.shutil, "which", lambda name: None)
    real = doc._version
    monkeypatch.setattr(doc, "_version", lambda m: (None, "ImportError") if m in ("tensorrt", "cuda.bindings", "cuda")
                        else real(m))


def test_doctor_reports_no_gpu_with_install_hints(nothing_installed):
    report, text = doc.doctor()
    assert report["gpu"] == {"found": False, "reason": "cuda-python is not installed and nvidia-smi is not on PATH"}
    assert report["tensorrt"]["version"] is None and not report["can_build"]
    assert report["onnxruntime"]["version"] and "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert text.splitlines()[0] == "gpu          none (cuda-python is not installed and nvidia-smi is not on PATH)"
    assert "sdrt build   not available here" in text
    assert f"hint         {doc.HINTS['tensorrt']}" in text and f"hint         {doc.HINTS['cuda-python']}" in text


def test_doctor_as_it_is_on_this_machine():
    report, text = doc.doctor()
    if report["gpu"]["found"]:
        pytest.skip("this machine has a GPU")
    assert text.startswith("gpu          none (") and "onnxruntime  " in text and doc.HINTS["gpu"] in text


def test_build_preflight_refuses_in_one_line(nothing_installed):
    with pytest.raises(MissingDependency) as e:
        doc.build_preflight()
    assert str(e.value) == (
        "sdrt build cannot run here: no NVIDIA GPU (no CUDA device or driver), no cuda-python, no TensorRT. It needs "
        "an NVIDIA GPU with its driver, TensorRT >= 10 and cuda-python (pip install 'sdrt[gpu]'); `sdrt doctor` "
        "shows what this machine has")
    assert "\n" not in str(e.value) and e.value.exit_code == 7


def test_build_engines_refuses_before_touching_the_bundle(tmp_path):
    if _has_gpu_and_trt():
        pytest.skip("this machine can build")
    from sdrt.export.build import build_engines

    with pytest.raises(MissingDependency, match="^sdrt build cannot run here: no NVIDIA GPU"):
        build_engines(tmp_path / "no-such-bundle", engines_dir=tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_auto_backend_is_onnxruntime_without_engines_and_tensorrt_says_why(tmp_path):
    if _has_gpu_and_trt():
        pytest.skip("this machine has TensorRT")
    from sdrt.errors import InvalidRequest
    from sdrt.runtime.engines.trt_backend import choose_backend, load_tensorrt_engines
    from test_engine_store import fake_manifest

    m = fake_manifest()
    assert choose_backend("auto", tmp_path, m, tmp_path / "engines") == "onnxruntime"
    assert choose_backend("tensorrt", tmp_path, m) == "tensorrt"
    with pytest.raises(InvalidRequest, match="backend 'cuda'"):
        choose_backend("cuda", tmp_path, m)
    with pytest.raises(MissingDependency, match=r"pip install 'sdrt\[gpu\]'"):
        load_tensorrt_engines(tmp_path, m, tmp_path / "engines")


def test_onnxruntime_on_gpu_refuses_without_the_cuda_provider(tmp_path):
    from sdrt.runtime.engines.ort_gpu import OrtCudaEngine, cuda_provider_available

    if cuda_provider_available():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(MissingDependency, match="pip install onnxruntime-gpu"):
        OrtCudaEngine(tmp_path / "model.onnx", "unet")


def test_build_errors_name_memory_and_tensorrt_messages():
    from sdrt.errors import BuildFailed, DeviceOutOfMemory
    from sdrt.export.build import build_error

    oom = build_error("unet-512x512-b2-t77-fp16", ["Requested amount of GPU memory (8589934592 bytes) could not be "
                                                   "allocated. There may not be enough free memory for allocation "
                                                   "to succeed.", "out of memory"], 2**30, 80 * 2**30)
    assert isinstance(oom, DeviceOutOfMemory) and "1.00 GiB free of 80.00 GiB" in str(oom) and "--workspace" in str(oom)
    other = build_error("unet", ["Unsupported ONNX op"], 0, 0)
    assert isinstance(other, BuildFailed) and str(other) == "TensorRT could not build unet: Unsupported ONNX op"


# -- the fp16 graph for strongly typed networks ------------------------------------------------------------
onnx = pytest.importorskip("onnx")


def _small_graph():
    """Conv -> GroupNorm-as-InstanceNorm -> MatMul -> LayerNorm, a time-embedding Sin kept fp32, an upsample
    whose scales must stay fp32, a Cast to float, and two outputs."""
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1], name="/m/conv/Conv"),
        helper.make_node("InstanceNormalization", ["c", "in_s", "in_b"], ["n"], name="/m/norm/InstanceNormalization"),
        helper.make_node("Constant", [], ["scales"], value=numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32)),
                         name="/m/up/Constant"),
        helper.make_node("Resize", ["n", "", "scales"], ["u"], mode="nearest", name="/m/up/Resize"),
        helper.make_node("Reshape", ["u", "shape"], ["r"], name="/m/Reshape"),
        helper.make_node("MatMul", ["r", "mm_w"], ["mm"], name="/m/proj/MatMul"),
        helper.make_node("Cast", ["t"], ["tf"], to=TP.FLOAT, name="/m/time_proj/Cast"),
        helper.make_node("Mul", ["tf", "freq"], ["tm"], name="/m/time_proj/Mul"),
        helper.make_node("Sin", ["tm"], ["ts"], name="/m/time_proj/Sin"),
        helper.make_node("Add", ["mm", "ts"], ["a"], name="/m/Add"),
        helper.make_node("LayerNormalization", ["a", "ln_s", "ln_b"], ["y"], axis=-1, name="/m/ln/LayerNormalization"),
        helper.make_node("Softmax", ["a"], ["z"], axis=-1, name="/m/Softmax"),
    ]
    inits = [w("conv_w", 4, 3, 3, 3), w("in_s", 4), w("in_b", 4), w("mm_w", 16, 8), w("ln_s", 8), w("ln_b", 8),
             numpy_helper.from_array(np.array([1, 64, 16], np.int64), "shape"),
             numpy_helper.from_array(np.linspace(0.01, 1, 8).astype(np.float32), "freq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8]),
                                           helper.make_tensor_value_info("t", TP.INT64, [1])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, None),
                               helper.make_tensor_value_info("z", TP.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_fp16_conversion_keeps_io_norms_time_embedding_and_scales_fp32():
    from onnx import TensorProto as TP

    from sdrt.export.passes.fp16 import convert_model

    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32),
             "t": np.array([981], np.int64)}
    ref = _run(_small_graph(), feeds)
    model = onnx.shape_inference.infer_shapes(_small_graph())
    convert_model(model)
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert inits["conv_w__fp16"] == inits["mm_w__fp16"] == TP.FLOAT16 and "conv_w" not in inits
    assert inits["ln_s"] == inits["in_s"] == inits["freq"] == TP.FLOAT  # norms and the time embedding: fp32
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert resize.input[2].endswith("__tofp32")  # the scales input is float32 again
    time_cast = next(n for n in model.graph.node if n.name == "/m/time_proj/Cast")
    assert time_cast.attribute[0].i == TP.FLOAT
    got = _run(model, feeds)
    assert [g.dtype for g in got] == [np.float32, np.float32]  # graph outputs stay fp32
    for r, g in zip(ref, got):
        assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-2


def test_fp16_conversion_of_exported_graphs_matches_fp32(bundles, tmp_path):
    """The tiny SD bundle's four graphs, converted and run by ONNX Runtime on the CPU against the originals."""
    import onnxruntime as ort

    from sdrt.export.passes.fp16 import convert_file

    rng = np.random.default_rng(0)
    dims = {"batch": 2, "height": 8, "width": 8, "tokens": 77}
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        src = bundles["sd2"] / comp / "model.onnx"
        out = convert_file(src, tmp_path / comp)
        assert (tmp_path / comp / "model.onnx_data").is_file()
        s32, s16 = ort.InferenceSession(str(src)), ort.InferenceSession(str(out))
        feeds = {i.name: (rng.standard_normal([d if isinstance(d, int) else dims[d] for d in i.shape])
                          * (300 if i.name == "timestep" else 1)).astype(np.float32) for i in s32.get_inputs()}
        for r, g in zip(s32.run(None, feeds), s16.run(None, feeds)):
            assert g.dtype == np.float32
            assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-2, comp


# -- benchmarks/gpu_check.py on a machine without a GPU ------------------------------------------------------
def test_gpu_check_parses_arguments_and_fails_in_one_line_without_gpu():
    script = ROOT / "benchmarks" / "gpu_check.py"
    help_ = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--replays" in help_.stdout and "--skip-trt" in help_.stdout
    if _has_gpu_and_trt():
        pytest.skip("this machine has a GPU")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("gpu_check: no usable GPU here: ")


def test_a_tensorrt_engine_that_does_not_match_the_manifest_frees_the_device_memory(monkeypatch, tmp_path):
    """Fault injection: load_tensorrt_engines stands in for TensorRT (no GPU here) with an engine whose inputs the
    manifest does not promise; check_io refuses it, and the session that owns the device memory is closed."""
    from sdrt.errors import BundleCorrupt
    from sdrt.runtime import engines as eng
    from sdrt.runtime.manifest import TensorSpec
    from test_engine_store import fake_manifest

    class Session:
        closed = False

        def close(self):
            self.closed = True

    class Wrong:
        inputs = {"x": TensorSpec("x", "float32", (1,))}
        outputs = {}

    session = Session()
    monkeypatch.setattr(eng, "choose_backend", lambda *a: "tensorrt")
    monkeypatch.setattr(eng, "load_tensorrt_engines", lambda *a: ({"unet": Wrong()}, session))
    with pytest.raises(BundleCorrupt, match="unet graph does not match"):
        eng.open_engines(tmp_path, fake_manifest(), "tensorrt")
    assert session.closed
