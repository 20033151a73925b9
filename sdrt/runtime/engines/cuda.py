"""The thin CUDA layer, through cuda-python's runtime bindings (no torch, no CuPy at run time).

cuda-python returns a tuple (cudaError_t, *results) from every call instead of raising: `check` turns a
failure into a typed sdrt error (`map_cuda_error`) and returns the results. Everything here takes the
bindings module as `rt` (default: the installed one) so the tests can inject faults such as out-of-memory or
a failed stream capture without a GPU.

API reference: https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html
(cudaMalloc, cudaMallocHost, cudaMemcpyAsync, cudaStreamCreateWithFlags, cudaStreamBeginCapture,
cudaStreamEndCapture, cudaGraphInstantiate, cudaGraphLaunch, cudaStreamSynchronize, cudaMemGetInfo).
"""
from __future__ import annotations

import ctypes

import numpy as np

from ...errors import DeviceError, DeviceOutOfMemory, MissingDependency
from .store import GpuInfo

INSTALL = "pip install 'sdrt[gpu]' (cuda-python and TensorRT)"
NO_GPU_ERRORS = ("cudaErrorNoDevice", "cudaErrorInsufficientDriver", "cudaErrorInitializationError",
                 "cudaErrorSystemDriverMismatch", "cudaErrorCompatNotSupportedOnDevice")
ALIGN = 256  # TensorRT wants tensor addresses 256-byte aligned; cudaMalloc gives at least that


def runtime():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt
        except ImportError:
            raise MissingDependency(f"the GPU path needs cuda-python: {INSTALL}") from None
    return rt


def _name(rt, err) -> str:
    name = getattr(err, "name", None)
    if name:
        return name
    try:
        return rt.cudaGetErrorName(err)[1].decode()
    except Exception:  # noqa: BLE001 - a name for the message only
        return str(err)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def map_cuda_error(rt, err, what: str) -> Exception:
    """The typed error for CUDA error `err` from call `what`: out of memory names free/total memory and what
    to reduce; no device or driver is a missing dependency; anything else a DeviceError naming CUDA's error."""
    name = _name(rt, err)
    if name == "cudaErrorMemoryAllocation":
        free, total = mem_info_or_none(rt)
        have = f"{_gib(free)} free of {_gib(total)}" if total else "free memory unknown"
        return DeviceOutOfMemory(f"out of GPU memory in {what} ({have}); use a smaller --batch or image size, a "
                                 "smaller --workspace when building, or close other programs using the GPU")
    if name in NO_GPU_ERRORS:
        return MissingDependency(f"no usable NVIDIA GPU: {what} failed with {name} (no GPU, or no/old driver); "
                                 "`sdrt doctor` shows what this machine has")
    return DeviceError(f"CUDA error in {what}: {name}")


def check(rt, result, what: str):
    """Unpack cuda-python's (err, *values): raise the mapped error, else return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:  # cudaSuccess
        raise map_cuda_error(rt, err, what)
    return values[0] if len(values) == 1 else (tuple(values) or None)


def mem_info_or_none(rt) -> tuple[int, int]:
    """(free, total) bytes, or (0, 0) when even that fails (the context may be broken after a fault)."""
    try:
        err, free, total = rt.cudaMemGetInfo()
        return (int(free), int(total)) if int(err) == 0 else (0, 0)
    except Exception:  # noqa: BLE001 - used only to enrich an error message
        return 0, 0


def device_info(rt=None, device: int = 0) -> GpuInfo:
    rt = rt or runtime()
    count = check(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise MissingDependency("no NVIDIA GPU found (cudaGetDeviceCount is 0); `sdrt doctor` shows what this machine has")
    props = check(rt, rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    driver = check(rt, rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name, f"{props.major}.{props.minor}", cuda_version_text(driver), int(props.totalGlobalMem))


def cuda_version_text(v: int) -> str:
    """CUDA encodes versions as 1000·major + 10·minor: 12040 -> "12.4"."""
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


class Stream:
    """A non-blocking stream: TensorRT's enqueue must not run on the legacy default stream (it syncs with
    everything, and stream capture refuses it)."""

    def __init__(self, rt=None):
        self.rt = rt or runtime()
        self.handle = check(self.rt, self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking),
                            "cudaStreamCreateWithFlags")

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self, what: str = "cudaStreamSynchronize") -> None:
        check(self.rt, self.rt.cudaStreamSynchronize(self.handle), what)

    def close(self) -> None:
        if self.handle is not None:
            self.rt.cudaStreamDestroy(self.handle)
            self.handle = None


class DeviceBuffer:
    def __init__(self, nbytes: int, rt=None, what: str = "cudaMalloc"):
        self.rt, self.nbytes = rt or runtime(), max(int(nbytes), 1)
        self.ptr = int(check(self.rt, self.rt.cudaMalloc(self.nbytes), f"{what} ({_gib(self.nbytes)})"))

    def close(self) -> None:
        if self.ptr:
            self.rt.cudaFree(self.ptr)
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory: copies from it are truly asynchronous and may be captured in a CUDA graph.
    `view` gives numpy arrays over it (no copy)."""

    def __init__(self, nbytes: int, rt=None):
        self.rt, self.nbytes = rt or runtime(), max(int(nbytes), 1)
        self.ptr = int(check(self.rt, self.rt.cudaMallocHost(self.nbytes), f"cudaMallocHost ({_gib(self.nbytes)})"))
        self._raw = (ctypes.c_ubyte * self.nbytes).from_address(self.ptr)

    def view(self, dtype, shape, offset: int = 0) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if offset + count * dtype.itemsize > self.nbytes:
            raise DeviceError(f"pinned view of {count} x {dtype} at {offset} exceeds the {self.nbytes}-byte buffer")
        return np.frombuffer(self._raw, dtype, count, offset).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            self._raw = None
            self.rt.cudaFreeHost(self.ptr)
            self.ptr = 0


def copy_htod(rt, dst: int, src: int, nbytes: int, stream: Stream) -> None:
    check(rt, rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
          "cudaMemcpyAsync (host to device)")


def copy_dtoh(rt, dst: int, src: int, nbytes: int, stream: Stream) -> None:
    check(rt, rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
          "cudaMemcpyAsync (device to host)")


def _null(handle) -> bool:
    return handle is None or int(handle) == 0


class CaptureFailed(Exception):
    """Stream capture or graph instantiation failed; the caller falls back to running without a graph."""


class Graph:
    """The work `fn()` enqueues on `stream`, captured once and replayed with one cudaGraphLaunch.

    Capture mode ThreadLocal: work another thread of this process puts on the legacy stream is not an error
    (Global mode would invalidate our capture), while our own thread is still checked."""

    def __init__(self, stream: Stream, fn, rt=None):
        self.rt, self.stream, self.graph, self.exec = rt or stream.rt, stream, None, None
        rt = self.rt
        check(rt, rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")
        failure = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure inside capture: end it, then report it
            failure = e
        err, graph = rt.cudaStreamEndCapture(stream.handle)  # always end: a stream left capturing is unusable
        rt.cudaGetLastError()  # clear the error an invalidated capture leaves behind
        if failure is not None or int(err) != 0 or _null(graph):
            if not _null(graph):
                rt.cudaGraphDestroy(graph)
            raise CaptureFailed(str(failure) if failure else f"cudaStreamEndCapture: {_name(rt, err)}")
        self.graph = graph
        err, graph_exec = rt.cudaGraphInstantiate(graph, 0)
        if int(err) != 0:
            rt.cudaGetLastError()
            self.close()
            raise CaptureFailed(f"cudaGraphInstantiate: {_name(rt, err)}")
        self.exec = graph_exec

    def launch(self) -> None:
        check(self.rt, self.rt.cudaGraphLaunch(self.exec, self.stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        if self.exec is not None:
            self.rt.cudaGraphExecDestroy(self.exec)
            self.exec = None
        if self.graph is not None:
            self.rt.cudaGraphDestroy(self.graph)
            self.graph = None
