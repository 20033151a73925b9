"""The hardware side of the runtime: every backend that runs a bundle's graphs, behind one `Engine` interface
(named numpy arrays in, named numpy arrays out).

- `base`: the `Engine` interface and its input checks;
- `ort`: ONNX Runtime on the CPU, `native_ops` + `native/`: sdrt's own CPU operators for it (C++, compiled
  on the user's machine at first use);
- `ort_gpu`: ONNX Runtime's CUDA provider with CUDA graphs;
- `trt_engine`, `trt_profiles`, `trt_backend`: TensorRT (engine and session, the static shapes each engine is
  built for, choosing and opening the backend), `cuda`: the cuda-python layer they stand on, `store`: the
  engine store that `sdrt build` writes and the runtime reads.

Imports point one way: the pipeline (sdrt.runtime) asks this package for engines through `open_engines`;
nothing here imports the pipeline, its text, sampler or mode modules. What it reads of the bundle is the
manifest, the graph names and the model family's input shapes (sdrt.runtime.manifest, names, families).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import BundleCorrupt, InvalidRequest
from .. import names
from ..manifest import Manifest
from .base import Engine
from .ort import OrtEngine
from .trt_backend import BACKENDS, choose_backend, load_tensorrt_engines

__all__ = ["BACKENDS", "Engine", "OpenEngines", "OrtEngine", "check_io", "choose_backend", "load_tensorrt_engines",
           "open_engines", "open_onnx"]


@dataclass
class OpenEngines:
    backend: str  # "onnxruntime" or "tensorrt": what "auto" chose
    engines: dict[str, Engine]  # component -> engine, every component the bundle's family needs
    session: object = None  # TensorRT: the TrtSession that owns the engines' device memory (keep it alive)


def open_engines(bundle: Path, manifest: Manifest, backend: str = "auto", engines: str | Path | None = None,
                 threads: int | None = None, int8: bool = False) -> OpenEngines:
    """Open the bundle's graphs on `backend` ("auto", "onnxruntime" or "tensorrt"; engines: the engine store,
    default ./engines) and check each against the manifest. int8: the U-Net's int8 graph, on ONNX Runtime."""
    if backend not in BACKENDS:
        raise InvalidRequest(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if int8:
        _check_int8(bundle, manifest, backend)
        backend = "onnxruntime"
    backend, session = choose_backend(backend, bundle, manifest, engines), None
    if backend == "tensorrt":
        opened, session = load_tensorrt_engines(bundle, manifest, engines)
    else:
        chosen = {**manifest.cpu_graphs, **(manifest.int8_graphs if int8 else {})}
        opened = {comp: OrtEngine(bundle / chosen.get(comp, g.path), comp, threads)
                  for comp, g in manifest.graphs.items() if comp in manifest.required_components}
    try:
        check_io(manifest, opened)
    except BaseException:
        if session is not None:
            session.close()  # the engines' device memory, which nothing would free otherwise
        raise
    return OpenEngines(backend, opened, session)


def open_onnx(bundle: Path, manifest: Manifest, component: str, rel: str, threads: int | None = None) -> Engine:
    """One graph of the bundle (rel: its path in the bundle) on ONNX Runtime's CPU, checked against the manifest."""
    engine = OrtEngine(bundle / rel, component, threads)
    check_io(manifest, {component: engine})
    return engine


def check_io(manifest: Manifest, engines: dict[str, Engine]) -> None:
    """The graphs on disk must have the inputs and outputs the manifest promises (names, dtypes, ranks)."""
    for comp, engine in engines.items():
        spec = manifest.graphs[comp]
        for promised, actual in ((spec.inputs, engine.inputs), (spec.outputs, engine.outputs)):
            for t in promised:
                got = actual.get(t.name)
                if got is None or got.dtype != t.dtype or len(got.shape) != len(t.shape):
                    raise BundleCorrupt(f"{comp} graph does not match {names.MANIFEST_FILE}: tensor {t.name!r} "
                                        f"should be {t.dtype} {list(t.shape)}, found {got}; re-export the bundle")


def _check_int8(path: Path, manifest: Manifest, backend: str) -> None:
    if backend == "tensorrt":
        raise InvalidRequest("int8 is an ONNX Runtime CPU mode; TensorRT engines are fp16: drop one of the two")
    if names.UNET not in manifest.int8_graphs:
        raise InvalidRequest(f"bundle {str(path)!r} has no int8 U-Net; export it with `sdrt export SRC --out "
                             "BUNDLE --int8`, or generate without int8")
