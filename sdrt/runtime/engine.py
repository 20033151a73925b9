"""One engine interface for every backend: named numpy arrays in, named numpy arrays out.

This file holds the interface and the ONNX Runtime backend (CPU execution provider). The engine reads each
input's dtype and rank from the session it opened, checks what it is given against them, and casts between
dtypes of the same kind (an optimum graph may take int32 ids or an int64 timestep where sdrt's take int64
and float32), so graphs exported by other tools run too.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import BundleCorrupt, EngineError
from .manifest import TensorSpec

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


class Engine(ABC):
    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(self.prepare(feeds))

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, ranks, static dims and dtype kinds; cast to the graph's dtype."""
        unknown = set(feeds) - set(self.inputs)
        missing = set(self.inputs) - set(feeds)
        if unknown or missing:
            raise EngineError(f"{self.name}: inputs {sorted(feeds)} do not match the graph's {sorted(self.inputs)}")
        out = {}
        for key, value in feeds.items():
            spec, value = self.inputs[key], np.asarray(feeds[key])
            if value.ndim != len(spec.shape):
                raise EngineError(f"{self.name}: input {key!r} has shape {value.shape}, "
                                  f"the graph expects rank {len(spec.shape)} {spec.shape}")
            for got, want in zip(value.shape, spec.shape):
                if isinstance(want, int) and want != got:
                    raise EngineError(f"{self.name}: input {key!r} has shape {value.shape}, the graph expects {spec.shape}")
            want = np.dtype(spec.dtype)
            if value.dtype != want:
                if value.dtype.kind != want.kind and not (value.dtype.kind in "iu" and want.kind in "iu"):
                    raise EngineError(f"{self.name}: input {key!r} is {value.dtype}, the graph expects {want}")
                value = value.astype(want)
            out[key] = value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d arrays 0-d
        return out


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape)


class OrtEngine(Engine):
    """ONNX Runtime on the CPU execution provider."""

    def __init__(self, path: Path, name: str, threads: int | None = None,
                 overrides: dict[str, np.ndarray] | None = None):
        """overrides: initializer name -> replacement value (LoRA-patched weights). ONNX Runtime (1.32) builds
        what it precomputes from a weight out of the graph file's copy and misses an override: the NCHWc layout
        pass (convolution weights, reordered) and constant folding (the CPU graph's Winograd transforms of 3x3
        convolution weights, export/winograd.py). So a patched convolution turns off the first, a patched 3x3
        convolution also the second; the transforms are then computed on every call (a few % of a U-Net call)."""
        import onnxruntime as ort

        self.name, self.path, self.threads = name, path, threads
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
        self._overrides = [ort.OrtValue.ortvalue_from_numpy(v) for v in (overrides or {}).values()]  # kept alive
        for key, value in zip(overrides or {}, self._overrides):
            opts.add_initializer(key, value)
        patched = [np.shape(v) for v in (overrides or {}).values()]
        off = (["NchwcTransformer"] if any(len(s) == 4 for s in patched) else []) + \
            (["ConstantFolding"] if any(s[-2:] == (3, 3) for s in patched if len(s) == 4) else [])
        extra = {"disabled_optimizers": off} if off else {}
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"],
                                                **extra)
        except Exception as e:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            raise BundleCorrupt(f"{name} graph {str(path)!r} could not be loaded by ONNX Runtime ({e}); "
                                "re-export the bundle with `sdrt export`") from None
        self.inputs = {a.name: _spec(a) for a in self.session.get_inputs()}
        self.outputs = {a.name: _spec(a) for a in self.session.get_outputs()}
        self._output_names = list(self.outputs)

    def _run(self, feeds):
        try:
            results = self.session.run(self._output_names, feeds)
        except Exception as e:
            raise EngineError(f"{self.name} failed in ONNX Runtime: {e}") from None
        return dict(zip(self._output_names, results))
