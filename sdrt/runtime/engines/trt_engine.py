"""TensorRT engines behind sdrt's Engine interface, run through cuda-python with CUDA graphs.

Per call: the numpy inputs are copied into one pinned host block, then ONE host->device copy, the engine, and
ONE device->host copy run on our own non-blocking stream; after the first (warm-up) call those three are
captured in a CUDA graph and replayed with one launch. Every buffer is allocated at load; the loop allocates
nothing on the device. All engines of a pipeline share one activation block ("device memory"), sized for the
largest: they run one after another on one stream, so they never use it at the same time.

The pure parts (dtype mapping, buffer layout, which engine fits a request, error mapping) are functions
tested on the CPU; the TensorRT calls follow the TensorRT 10/11 Python API:
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
(set_input_shape, set_tensor_address, set_device_memory(ptr, size), execute_async_v3(stream)) and
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
(num_io_tensors, get_tensor_name/mode/dtype/shape, get_tensor_profile_shape, device_memory_size_v2).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ...errors import DeviceError, DeviceOutOfMemory, EngineError, EngineNotBuilt, MissingDependency, StaleEngine
from . import cuda
from .base import Engine
from ..manifest import TensorSpec
from .trt_profiles import fit

TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
                "INT8": "int8", "UINT8": "uint8"}


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependency(f"the TensorRT backend needs TensorRT >= 10: {cuda.INSTALL}") from None
    return trt


def numpy_dtype(trt_dtype) -> str:
    """TensorRT DataType -> numpy dtype name; bf16/fp8 have no numpy type and are refused."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in TRT_TO_NUMPY:
        raise StaleEngine(f"engine tensor type {name} has no numpy equivalent; rebuild with `sdrt build`")
    return TRT_TO_NUMPY[name]


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the block
    nbytes: int


def layout(specs: list[TensorSpec], align: int = cuda.ALIGN) -> tuple[tuple[Slot, ...], int]:
    """Pack tensors into one block, each at an `align`-byte boundary (TensorRT requires 256): one copy moves
    them all. Returns the slots and the block's size."""
    slots, offset = [], 0
    for t in specs:
        if not all(isinstance(d, int) and d >= 0 for d in t.shape):
            raise StaleEngine(f"engine tensor {t.name!r} has a dynamic shape {t.shape}; sdrt builds static "
                              "engines: rebuild with `sdrt build`")
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
        slots.append(Slot(t.name, t.dtype, tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // align) * align
    return tuple(slots), offset


def deserialize_error(name: str, plan_bytes: int, free: int, total: int) -> Exception:
    """Why deserialize_cuda_engine returned None: no room for the weights, else a plan this TensorRT can't read."""
    if total and free < plan_bytes:
        return DeviceOutOfMemory(f"{name}: the engine's {plan_bytes / 2**30:.2f} GiB of weights do not fit in "
                                 f"{free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB; close other programs "
                                 "using the GPU, or build for a smaller batch or image size")
    return StaleEngine(f"{name}: TensorRT could not deserialize the engine (built by another TensorRT version or "
                       "for another GPU?); rebuild it with `sdrt build`")


class DeviceMemoryPool:
    """One activation block for every engine of a pipeline: `reserve` each engine's need, then `allocate`."""

    def __init__(self, rt):
        self.rt, self.size, self.buffer = rt, 0, None

    def reserve(self, nbytes: int) -> None:
        if self.buffer is not None and nbytes > self.size:
            raise DeviceError(f"device memory pool already allocated at {self.size} bytes, {nbytes} needed")
        self.size = max(self.size, int(nbytes))

    def allocate(self) -> int:
        if self.buffer is None:
            self.buffer = cuda.DeviceBuffer(self.size, self.rt, "cudaMalloc of the engines' shared activation memory")
        return self.buffer.ptr

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None


def make_logger(trt):
    """A TensorRT logger that keeps error messages, so a failure can say what TensorRT said."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return Logger()


class TrtSession:
    """What the engines of one pipeline share: TensorRT's runtime, one stream, one activation block."""

    def __init__(self, trt=None, rt=None):
        self.trt, self.rt = trt or import_tensorrt(), rt or cuda.runtime()
        self.logger = make_logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = cuda.Stream(self.rt)
        self.pool = DeviceMemoryPool(self.rt)
        self.engines: list[TensorRTEngine] = []

    def engine(self, plan, name: str, use_graph: bool = True) -> "TensorRTEngine":
        e = TensorRTEngine(plan, name, self, use_graph)
        self.engines.append(e)
        return e

    def activate(self) -> None:
        """Allocate the shared block (sized for the largest engine) and every engine's buffers."""
        ptr = self.pool.allocate()
        for e in self.engines:
            e.bind(ptr, self.pool.size)

    def close(self) -> None:
        for e in self.engines:
            e.close()
        self.pool.close()
        self.stream.close()


def _trt_call(ok, what: str, logger) -> None:
    """TensorRT setters return False instead of raising."""
    if not ok:
        said = f": {logger.errors[-1]}" if logger.errors else ""
        raise DeviceError(f"TensorRT {what} failed{said}")


class TensorRTEngine(Engine):
    """One static-shape plan. `inputs`/`outputs` are its exact shapes; `run_padded` takes fewer batch rows."""

    def __init__(self, plan, name: str, session: TrtSession, use_graph: bool = True):
        self.name, self.session, self.use_graph = name, session, use_graph
        trt, rt = session.trt, session.rt
        self.engine = session.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            free, total = cuda.mem_info_or_none(rt)
            raise deserialize_error(name, memoryview(plan).nbytes, free, total)
        self.context = _create_context(trt, self.engine)
        if self.context is None:
            raise DeviceError(f"{name}: TensorRT could not create an execution context")
        self.inputs, self.outputs = self._io_specs(trt)
        self.in_slots, self.in_bytes = layout(list(self.inputs.values()))
        self.out_slots, self.out_bytes = layout(list(self.outputs.values()))
        session.pool.reserve(_device_memory_size(self.engine))
        self._graph, self._graph_failed, self._calls = None, False, 0
        self._buffers = []

    def _io_specs(self, trt) -> tuple[dict, dict]:
        ins, outs = {}, {}
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            dtype, shape = numpy_dtype(self.engine.get_tensor_dtype(n)), tuple(self.engine.get_tensor_shape(n))
            if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                if -1 in shape:  # a dynamic graph axis: the plan's one profile pins it (min = opt = max)
                    low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
                    if low != high:
                        raise StaleEngine(f"{self.name}: input {n!r} has a shape range {low}..{high}; sdrt builds "
                                          "static engines: rebuild with `sdrt build`")
                    shape = high
                _trt_call(self.context.set_input_shape(n, shape), f"set_input_shape({n}, {shape})",
                          self.session.logger)
                ins[n] = TensorSpec(n, dtype, shape)
            else:
                outs[n] = TensorSpec(n, dtype, ())
        for n, spec in outs.items():  # output shapes follow from the input shapes just set
            outs[n] = TensorSpec(n, spec.dtype, tuple(self.context.get_tensor_shape(n)))
        return ins, outs

    def bind(self, pool_ptr: int, pool_size: int) -> None:
        rt, logger = self.session.rt, self.session.logger
        _set_device_memory(self.context, pool_ptr, pool_size)
        self.dev_in = cuda.DeviceBuffer(self.in_bytes, rt, f"cudaMalloc of {self.name} inputs")
        self.dev_out = cuda.DeviceBuffer(self.out_bytes, rt, f"cudaMalloc of {self.name} outputs")
        self.host_in, self.host_out = cuda.PinnedBuffer(self.in_bytes, rt), cuda.PinnedBuffer(self.out_bytes, rt)
        self._buffers = [self.dev_in, self.dev_out, self.host_in, self.host_out]
        for slots, dev in ((self.in_slots, self.dev_in), (self.out_slots, self.dev_out)):
            for s in slots:
                _trt_call(self.context.set_tensor_address(s.name, dev.ptr + s.offset),
                          f"set_tensor_address({s.name})", logger)
        self._in_views = {s.name: self.host_in.view(s.dtype, s.shape, s.offset) for s in self.in_slots}
        self._out_views = {s.name: self.host_out.view(s.dtype, s.shape, s.offset) for s in self.out_slots}

    def _enqueue(self) -> None:
        rt, stream = self.session.rt, self.session.stream
        cuda.copy_htod(rt, self.dev_in.ptr, self.host_in.ptr, self.in_bytes, stream)
        _trt_call(self.context.execute_async_v3(stream.ptr), f"{self.name} execute_async_v3", self.session.logger)
        cuda.copy_dtoh(rt, self.host_out.ptr, self.dev_out.ptr, self.out_bytes, stream)

    def _capture(self) -> None:
        """Capture the copies and the engine in a CUDA graph; on failure warn once and stay eager."""
        try:
            self._graph = cuda.Graph(self.session.stream, self._enqueue, self.session.rt)
        except cuda.CaptureFailed as e:
            self._graph_failed = True
            warnings.warn(f"{self.name}: CUDA graph capture failed ({e}); running without a graph (slower)")

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run_padded(feeds, 0)

    def run_padded(self, feeds: dict[str, np.ndarray], pad: int) -> dict[str, np.ndarray]:
        """Run with `pad` fewer batch rows than the engine's (they are zero-filled, and cut from the outputs)."""
        for name, view in self._in_views.items():
            value = feeds[name]
            if pad and view.ndim:
                rows = view.shape[0] - pad
                np.copyto(view[:rows], value, casting="same_kind")
                view[rows:] = 0
            else:
                np.copyto(view, value, casting="same_kind")
        if self._graph is not None:
            self._graph.launch()
        else:
            self._enqueue()
        self.session.stream.synchronize(f"{self.name} (cudaStreamSynchronize)")
        self._calls += 1
        if self._calls == 1 and self.use_graph and not self._graph_failed:
            self._capture()  # after the warm-up: TensorRT wants one enqueue before capture
        return {n: (v[: v.shape[0] - pad] if pad and v.ndim else v).copy() for n, v in self._out_views.items()}

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()  # before the buffers and the context it points into
            self._graph = None
        for b in self._buffers:
            b.close()
        self._buffers = []


def _create_context(trt, engine):
    """A context without its own activation memory (we give it the shared block): TensorRT >= 10 takes the
    USER_MANAGED strategy; older versions have create_execution_context_without_device_memory."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()


def _device_memory_size(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1; the only one in 11
    return int(size if size is not None else engine.device_memory_size)


def _set_device_memory(context, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1 (setDeviceMemoryV2 in C++)
        context.set_device_memory(ptr, size)  # a wrong argument raises here, not into the fallback
    else:
        context.device_memory = ptr  # TensorRT 8.6-10.0: the property, size implied


def merged_specs(specs: list[dict[str, TensorSpec]]) -> dict[str, TensorSpec]:
    """One spec per tensor over several engines: dims they agree on stay static, others become named axes.
    The batch axis is always named: a request may have fewer rows than an engine (they are padded)."""
    out = {}
    for name, first in specs[0].items():
        shapes = [s[name].shape for s in specs]
        dims = tuple("batch" if i == 0 else d if all(sh[i] == d for sh in shapes) else f"dim{i}"
                     for i, d in enumerate(first.shape))
        out[name] = TensorSpec(name, first.dtype, dims)
    return out


class TrtComponent(Engine):
    """A component (U-Net, ...) over its static engines, one per built shape: each call runs the engine that
    fits the inputs exactly, else the one needing the least batch padding."""

    def __init__(self, name: str, engines: list, build_hint: str):
        if not engines:
            raise EngineNotBuilt(f"no TensorRT engine for the {name}; {build_hint}")
        self.name, self.engines, self.build_hint = name, engines, build_hint
        self.inputs = merged_specs([e.inputs for e in engines])
        self.outputs = merged_specs([e.outputs for e in engines])

    def pick(self, feed_shapes: dict[str, tuple]):
        best = None
        for e in self.engines:
            pad = fit({n: s.shape for n, s in e.inputs.items()}, feed_shapes)
            if pad is not None and (best is None or pad < best[1]):
                best = (e, pad)
        if best is None:
            built = ", ".join(str({n: s.shape for n, s in e.inputs.items()}) for e in self.engines)
            raise EngineNotBuilt(f"no {self.name} engine takes inputs {feed_shapes}; built: {built}. "
                                 f"{self.build_hint}")
        return best

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine, pad = self.pick({n: tuple(v.shape) for n, v in feeds.items()})
        try:
            return engine.run_padded(feeds, pad)
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - a binding error from TensorRT or numpy: one typed line
            raise DeviceError(f"{self.name} failed on the GPU: {type(e).__name__}: {e}") from None
