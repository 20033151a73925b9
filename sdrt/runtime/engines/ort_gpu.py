"""ONNX Runtime on the GPU (CUDA execution provider) for machines without TensorRT.

Inputs and outputs live in device OrtValues bound once per input shape (I/O binding), so ONNX Runtime's
CUDA-graph option can capture a run and replay it: per call the inputs are copied in with `update_inplace`,
the graph replays, and the outputs are copied out. Each distinct set of input shapes gets its own graph id
(run option "gpu_graph_id"; -1 runs without a graph, used once per shape to learn the output shapes).
Reference: https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html (Using CUDA Graphs)
and https://onnxruntime.ai/docs/api/python/api_summary.html (IOBinding, OrtValue).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import BundleCorrupt, DeviceError, MissingDependency
from .base import Engine
from .ort import _spec

PROVIDER = "CUDAExecutionProvider"
INSTALL = "pip install onnxruntime-gpu (in place of onnxruntime)"


def cuda_provider_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return PROVIDER in ort.get_available_providers()


class _Bound:
    """One shape set: its device inputs/outputs, the binding, and the run options naming its graph."""

    def __init__(self, ort, session, feeds, outputs, device_id, graph_id):
        self.inputs = {n: ort.OrtValue.ortvalue_from_numpy(v, "cuda", device_id) for n, v in feeds.items()}
        self.outputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(v.shape, v.dtype, "cuda", device_id)
                        for n, v in outputs.items()}
        self.binding = session.io_binding()
        for n, v in self.inputs.items():
            self.binding.bind_ortvalue_input(n, v)
        for n, v in self.outputs.items():
            self.binding.bind_ortvalue_output(n, v)
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))


class OrtCudaEngine(Engine):
    """Same interface as OrtEngine; runs on the GPU, replaying a CUDA graph per input shape."""

    def __init__(self, path: Path, name: str, cuda_graph: bool = True, device_id: int = 0):
        import onnxruntime as ort

        if PROVIDER not in ort.get_available_providers():
            raise MissingDependency(f"ONNX Runtime on the GPU needs its CUDA provider: {INSTALL}")
        self.ort, self.name, self.path, self.device_id, self.cuda_graph = ort, name, path, device_id, cuda_graph
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = [(PROVIDER, {"device_id": str(device_id), "enable_cuda_graph": "1" if cuda_graph else "0"}),
                     "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT's own exception types
            raise BundleCorrupt(f"{name} graph {str(path)!r} could not be loaded by ONNX Runtime on the GPU "
                                f"({e})") from None
        self.inputs = {a.name: _spec(a) for a in self.session.get_inputs()}
        self.outputs = {a.name: _spec(a) for a in self.session.get_outputs()}
        self._bound: dict[tuple, _Bound] = {}
        self._plain = ort.RunOptions()
        self._plain.add_run_config_entry("gpu_graph_id", "-1")  # a run outside any captured graph

    def _binding(self, feeds: dict[str, np.ndarray]) -> _Bound:
        key = tuple(sorted((n, v.shape) for n, v in feeds.items()))
        bound = self._bound.get(key)
        if bound is None:
            names = list(self.outputs)
            first = dict(zip(names, self.session.run(names, feeds, run_options=self._plain)))  # output shapes
            bound = _Bound(self.ort, self.session, feeds, first, self.device_id, len(self._bound) + 1)
            self.session.run_with_iobinding(bound.binding, bound.options)  # the capturing run
            self._bound[key] = bound
        return bound

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            bound = self._binding(feeds)
            for n, v in feeds.items():
                bound.inputs[n].update_inplace(v)  # host -> the bound device buffer; the graph reads it there
            self.session.run_with_iobinding(bound.binding, bound.options)
            return {n: v.numpy() for n, v in bound.outputs.items()}
        except MissingDependency:
            raise
        except Exception as e:  # noqa: BLE001 - ORT's own exception types: one typed line
            raise DeviceError(f"{self.name} failed in ONNX Runtime on the GPU: {e}") from None
