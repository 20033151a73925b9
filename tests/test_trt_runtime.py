"""The TensorRT runtime's pure parts on the CPU: dtype mapping, buffer layout, engine choice, error mapping.

FAULT INJECTION ONLY: `FaultyCudart` below stands in for cuda-python's runtime module solely to make CUDA
calls fail (out of memory, a failed stream capture) in ways a CPU machine cannot produce. It is not a model
of a GPU; nothing here claims the CUDA path works — benchmarks/gpu_check.py checks that on a GPU. Where the
real cuda-python is installed, its error values and its no-driver failure are used as they are.
"""
from __future__ import annotations

import enum
import importlib.util
import warnings

import numpy as np
import pytest

from sdrt.errors import DeviceError, DeviceOutOfMemory, EngineNotBuilt, MissingDependency, StaleEngine
from sdrt.runtime import names
from sdrt.runtime.engines import cuda
from sdrt.runtime.manifest import TensorSpec
from sdrt.runtime.engines.trt_engine import (DeviceMemoryPool, TensorRTEngine, TrtComponent, deserialize_error, layout,
                                     merged_specs, numpy_dtype)

HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart") is not None)

Err = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorMemoryAllocation": 2, "cudaErrorNoDevice": 100,
                                   "cudaErrorIllegalAddress": 700, "cudaErrorStreamCaptureInvalidated": 901})
GiB = 2**30


class FaultyCudart:
    """Fault injection only (see the module docstring): each call answers as cuda-python does, (err, *values),
    failing where the test says."""

    cudaError_t = Err
    cudaStreamNonBlocking = 1
    cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeThreadLocal": 1})

    def __init__(self, malloc_fails=False, capture_fails=False, free=GiB, total=80 * GiB):
        self.malloc_fails, self.capture_fails, self.free, self.total = malloc_fails, capture_fails, free, total
        self.calls, self.next_ptr = [], 1 << 20

    def cudaMemGetInfo(self):
        return Err.cudaSuccess, self.free, self.total

    def cudaMalloc(self, n):
        self.calls.append(("cudaMalloc", n))
        if self.malloc_fails:
            return Err.cudaErrorMemoryAllocation, None
        self.next_ptr += n + 256
        return Err.cudaSuccess, self.next_ptr

    def cudaFree(self, ptr):
        self.calls.append(("cudaFree", ptr))
        return (Err.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.calls.append(("begin", mode))
        return (Err.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        self.calls.append(("end",))
        return (Err.cudaErrorStreamCaptureInvalidated, None) if self.capture_fails else (Err.cudaSuccess, 42)

    def cudaGraphInstantiate(self, graph, flags):
        return Err.cudaSuccess, 43

    def cudaGetLastError(self):
        self.calls.append(("clear",))
        return (Err.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        self.calls.append(("destroy", graph))
        return (Err.cudaSuccess,)


class _Stream:
    handle, ptr = 7, 7


# -- dtypes and layout -------------------------------------------------------------------------------------
class _DataType(enum.Enum):  # TensorRT's DataType members print as DataType.FLOAT etc.
    FLOAT, HALF, INT64, BF16 = range(4)


def test_tensorrt_dtypes_map_to_numpy_and_bf16_is_refused():
    assert [numpy_dtype(t) for t in (_DataType.FLOAT, _DataType.HALF, _DataType.INT64)] == ["float32", "float16", "int64"]
    assert numpy_dtype("DataType.INT32") == "int32"
    with pytest.raises(StaleEngine, match="BF16 .*sdrt build"):
        numpy_dtype(_DataType.BF16)


def test_layout_packs_tensors_at_256_byte_boundaries():
    specs = [TensorSpec(names.SAMPLE, "float32", (2, 4, 64, 64)), TensorSpec(names.TIMESTEP, "float32", (2,)),
             TensorSpec(names.ENCODER_HIDDEN_STATES, "float32", (2, 77, 768))]
    slots, total = layout(specs)
    assert [s.offset for s in slots] == [0, 131072, 131328]
    assert [s.nbytes for s in slots] == [131072, 8, 473088]
    assert total == 131328 + 473088 and all(s.offset % 256 == 0 for s in slots)
    with pytest.raises(StaleEngine, match="dynamic shape"):
        layout([TensorSpec("x", "float32", ("batch", 4))])


def test_merged_specs_name_the_batch_and_differing_dims():
    a = {"x": TensorSpec("x", "float32", (2, 4, 64, 64))}
    b = {"x": TensorSpec("x", "float32", (2, 4, 96, 96))}
    assert merged_specs([a, b])["x"].shape == ("batch", 4, "dim2", "dim3")
    assert merged_specs([a])["x"].shape == ("batch", 4, 64, 64)


class _Planned:
    """An engine as TrtComponent sees it: its static input specs and run_padded."""

    def __init__(self, h):
        self.inputs = {names.SAMPLE: TensorSpec(names.SAMPLE, "float32", (2, 4, h, h))}
        self.outputs = {names.OUT_SAMPLE: TensorSpec(names.OUT_SAMPLE, "float32", (2, 4, h, h))}
        self.h, self.runs = h, []

    def run_padded(self, feeds, pad):
        self.runs.append(pad)
        x = feeds[names.SAMPLE]
        return {names.OUT_SAMPLE: x * 2}


def test_component_runs_the_engine_that_fits_and_pads_a_smaller_batch():
    e64, e96 = _Planned(64), _Planned(96)
    unet = TrtComponent(names.UNET, [e64, e96], "run `sdrt build B`")
    out = unet(**{names.SAMPLE: np.ones((2, 4, 96, 96), np.float32)})
    assert e96.runs == [0] and out[names.OUT_SAMPLE].shape == (2, 4, 96, 96)
    unet(**{names.SAMPLE: np.ones((1, 4, 64, 64), np.float32)})  # guidance off: 1 row in a 2-row engine
    assert e64.runs == [1]
    with pytest.raises(EngineNotBuilt, match="no unet engine takes .*run `sdrt build B`"):
        unet(**{names.SAMPLE: np.ones((2, 4, 80, 80), np.float32)})
    with pytest.raises(EngineNotBuilt, match="no TensorRT engine for the unet"):
        TrtComponent(names.UNET, [], "hint")


# -- error mapping --------------------------------------------------------------------------------------
def test_out_of_memory_names_free_and_total_and_what_to_reduce():
    rt = FaultyCudart(malloc_fails=True, free=GiB, total=80 * GiB)
    with pytest.raises(DeviceOutOfMemory, match=r"1.00 GiB free of 80.00 GiB.*smaller --batch.*--workspace"):
        cuda.DeviceBuffer(100 * GiB, rt)


def test_other_cuda_errors_are_typed_and_named():
    rt = FaultyCudart()
    assert isinstance(cuda.map_cuda_error(rt, Err.cudaErrorNoDevice, "cudaGetDeviceCount"), MissingDependency)
    e = cuda.map_cuda_error(rt, Err.cudaErrorIllegalAddress, "unet (cudaStreamSynchronize)")
    assert isinstance(e, DeviceError) and str(e) == "CUDA error in unet (cudaStreamSynchronize): cudaErrorIllegalAddress"
    assert cuda.check(rt, (Err.cudaSuccess, 5), "x") == 5
    assert cuda.check(rt, (Err.cudaSuccess, 1, 2), "x") == (1, 2)
    assert cuda.check(rt, (Err.cudaSuccess,), "x") is None


def test_deserialize_failure_is_out_of_memory_or_a_stale_plan():
    assert isinstance(deserialize_error("unet", 2 * GiB, GiB, 80 * GiB), DeviceOutOfMemory)
    stale = deserialize_error("unet", 2 * GiB, 40 * GiB, 80 * GiB)
    assert isinstance(stale, StaleEngine) and "sdrt build" in str(stale)


@pytest.mark.skipif(not HAS_CUDA_PYTHON, reason="cuda-python is not installed")
def test_real_cuda_python_without_a_gpu_maps_to_missing_dependency():
    rt = cuda.runtime()
    err, count = rt.cudaGetDeviceCount()
    if int(err) == 0 and count:
        pytest.skip("this machine has a GPU")
    with pytest.raises(MissingDependency, match="no usable NVIDIA GPU"):
        cuda.device_info(rt)
    oom = cuda.map_cuda_error(rt, rt.cudaError_t.cudaErrorMemoryAllocation, "cudaMalloc")
    assert isinstance(oom, DeviceOutOfMemory) and "free memory unknown" in str(oom)


def test_without_cuda_python_the_runtime_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cuda(name, *args, **kwargs):
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_cuda)
    with pytest.raises(MissingDependency, match=r"cuda-python: pip install 'sdrt\[gpu\]'"):
        cuda.runtime()


# -- the shared activation block and graph capture ----------------------------------------------------------
def test_pool_is_one_block_sized_for_the_largest_engine():
    rt = FaultyCudart()
    pool = DeviceMemoryPool(rt)
    for need in (300, 5000, 1200):
        pool.reserve(need)
    ptr = pool.allocate()
    assert pool.allocate() == ptr and [c for c in rt.calls if c[0] == "cudaMalloc"] == [("cudaMalloc", 5000)]
    pool.reserve(4000)  # fits: fine
    with pytest.raises(DeviceError, match="already allocated"):
        pool.reserve(6000)
    pool.close()
    assert ("cudaFree", ptr) in rt.calls


def test_failed_capture_ends_the_capture_and_clears_the_error():
    rt = FaultyCudart(capture_fails=True)
    with pytest.raises(cuda.CaptureFailed, match="cudaErrorStreamCaptureInvalidated"):
        cuda.Graph(_Stream(), lambda: None, rt)
    assert [c[0] for c in rt.calls] == ["begin", "end", "clear"]  # the stream is not left capturing
    ok = cuda.Graph(_Stream(), lambda: None, FaultyCudart())
    assert ok.exec == 43


def test_engine_falls_back_to_plain_execution_with_a_warning_when_capture_fails():
    engine = object.__new__(TensorRTEngine)  # only the capture step: no TensorRT on this machine
    engine.name, engine._graph, engine._graph_failed = "unet test", None, False
    engine._enqueue = lambda: None

    class Session:
        rt, stream = FaultyCudart(capture_fails=True), _Stream()
    engine.session = Session()
    with pytest.warns(UserWarning, match="unet test: CUDA graph capture failed .* without a graph"):
        engine._capture()
    assert engine._graph is None and engine._graph_failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.session.rt = FaultyCudart()
        engine._graph_failed = False
        engine._capture()
    assert engine._graph is not None


@pytest.mark.skipif(not HAS_CUDA_PYTHON, reason="cuda-python is not installed")
def test_calls_are_accepted_by_the_real_bindings_and_fail_only_for_want_of_a_gpu():
    """Without a driver every call returns cudaErrorInsufficientDriver/NoDevice: reaching that error (rather
    than a TypeError) shows the arguments have the types cuda-python takes."""
    rt = cuda.runtime()
    err, count = rt.cudaGetDeviceCount()
    if int(err) == 0 and count:
        pytest.skip("this machine has a GPU")

    class NullStream:
        handle, ptr = rt.cudaStream_t(0), 0
    calls = [lambda: cuda.Stream(rt), lambda: cuda.DeviceBuffer(1024, rt), lambda: cuda.PinnedBuffer(1024, rt),
             lambda: cuda.copy_htod(rt, 0, 0, 16, NullStream()), lambda: cuda.copy_dtoh(rt, 0, 0, 16, NullStream()),
             lambda: cuda.Graph(NullStream(), lambda: None, rt),
             lambda: cuda.check(rt, rt.cudaEventCreate(), "cudaEventCreate")]
    for call in calls:
        with pytest.raises(MissingDependency, match="no usable NVIDIA GPU"):
            call()
