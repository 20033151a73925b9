"""The ONNX Runtime backend on the CPU execution provider (the one every machine has)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import BundleCorrupt, EngineError
from .. import names
from ..manifest import TensorSpec
from . import native_ops
from .base import Engine

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape)


class OrtEngine(Engine):
    """ONNX Runtime on the CPU execution provider.

    A small graph (weights up to SPLIT_MAX_WEIGHT_BYTES, e.g. the embedded model) runs on one thread per call:
    its operators are too small for ONNX Runtime to spread one over two cores (the embedded U-Net, batch 2, is
    slower on 2 threads than on 1). A batch is split into one piece per thread instead, the calling thread
    running the last: the same numbers as the whole batch (every graph here treats images independently).
    The VAE's graphs are exempt: their operators work at image resolution, large enough to share between cores
    even in a small model (the embedded VAE decoder takes 0.8x the time on 2 threads). Measured in
    benchmarks/NOTES.md, sections 8 and 9."""

    SPLIT_MAX_WEIGHT_BYTES = 64 << 20
    IMAGE_RESOLUTION = (names.VAE_DECODER, names.VAE_ENCODER)  # components that always get every thread

    def __init__(self, path: Path, name: str, threads: int | None = None,
                 overrides: dict[str, np.ndarray] | None = None, data_dir: Path | None = None):
        """data_dir: the folder the graph's external data lies in, when not the graph's own (a hypernetwork
        variant in unet/hypernet/ reads the U-Net's unet/model.onnx_data).

        overrides: initializer name -> replacement value (LoRA-patched weights). ONNX Runtime (1.32) builds
        what it precomputes from a weight out of the graph file's copy and misses an override: the NCHWc layout
        pass (convolution weights, reordered) and constant folding (the CPU graph's Winograd transforms of 3x3
        convolution weights, export/passes/winograd.py). So a patched convolution turns off the first, a patched 3x3
        convolution also the second; the transforms are then computed on every call (a few % of a U-Net call)."""
        import onnxruntime as ort

        self.name, self.path, self.threads = name, path, threads
        self.data_dir = Path(data_dir) if data_dir is not None else path.parent
        self._overrides = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in (overrides or {}).items()}  # kept alive
        patched = [np.shape(v) for v in (overrides or {}).values()]
        disabled = (["NchwcTransformer"] if any(len(s) == 4 for s in patched) else []) + \
            (["ConstantFolding"] if any(s[-2:] == (3, 3) for s in patched if len(s) == 4) else [])
        threads = threads or os.cpu_count() or 1
        small = (name not in self.IMAGE_RESOLUTION
                 and weight_bytes(path, self.data_dir) <= self.SPLIT_MAX_WEIGHT_BYTES)
        self.session = self._open(1 if small else threads, disabled)
        self.inputs = {a.name: _spec(a) for a in self.session.get_inputs()}
        self.outputs = {a.name: _spec(a) for a in self.session.get_outputs()}
        self._output_names = list(self.outputs)
        # Split only where every input and output leads with the same named dynamic dimension (the batch);
        # scalar inputs (a hypernetwork's strength) go whole to every piece.
        leading = {spec.shape[0] if spec.shape else None for spec in [*self.inputs.values(), *self.outputs.values()]
                   if spec.shape or spec.name not in self.inputs}
        named_batch = len(leading) == 1 and isinstance(name_ := leading.pop(), str) and name_ != "?"
        self._pieces = threads if small and named_batch else 1
        self._pool = None  # started at the first batch that is split

    def _open(self, threads: int, disabled: list[str]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
        if self.data_dir != self.path.parent:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.data_dir))
        for key, value in self._overrides.items():
            opts.add_initializer(key, value)
        self.native_ops = False  # whether sdrt's operators run; the graph's ONNX functions stand in otherwise
        if (library := native_ops.library()) is not None:
            try:
                opts.register_custom_ops_library(str(library))
                self.native_ops = True
            except Exception:  # noqa: BLE001 - an ONNX Runtime that refuses the library runs the functions
                pass
        extra = {"disabled_optimizers": disabled} if disabled else {}
        try:
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"],
                                        **extra)
        except Exception as e:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            raise BundleCorrupt(f"{self.name} graph {str(self.path)!r} could not be loaded by ONNX Runtime ({e}); "
                                "re-export the bundle with `sdrt export`") from None

    def _run(self, feeds):
        if self._pieces > 1:
            batch = {v.shape[0] for v in feeds.values() if v.ndim}
            if len(batch) == 1 and (size := batch.pop()) > 1:
                return self._run_split(feeds, min(self._pieces, size))
        return dict(zip(self._output_names, self._session_run(feeds)))

    def _run_split(self, feeds, pieces: int):
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._pieces - 1, thread_name_prefix="sdrt-ort")
        size = next(v for v in feeds.values() if v.ndim).shape[0]
        bounds = [size * i // pieces for i in range(pieces + 1)]
        parts = [{k: v[a:b] if v.ndim else v for k, v in feeds.items()} for a, b in zip(bounds[:-1], bounds[1:])]
        others = [self._pool.submit(self._session_run, part) for part in parts[:-1]]
        last = self._session_run(parts[-1])  # ONNX Runtime lets go of the GIL while it runs
        results = [f.result() for f in others] + [last]
        return {name: np.concatenate([r[i] for r in results]) for i, name in enumerate(self._output_names)}

    def _session_run(self, feeds) -> list:
        try:
            return self.session.run(self._output_names, feeds)
        except Exception as e:
            raise EngineError(f"{self.name} failed in ONNX Runtime: {e}") from None


def weight_bytes(path: Path, data_dir: Path | None = None) -> int:
    """The graph file plus the external-data files in its data folder (default: beside it; shared ones counted
    too: an upper bound)."""
    folder = path.parent if data_dir is None else data_dir
    return sum(p.stat().st_size for p in {path, *folder.glob("*.onnx_data"), *folder.glob("*.data"),
                                          *path.parent.glob("*.onnx_data")} if p.is_file())
