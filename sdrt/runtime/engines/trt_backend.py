"""Choosing and opening the TensorRT backend of a pipeline (the hook `Pipeline.load` calls).

backend="tensorrt": open this bundle's engines for this GPU from the store, or fail with a typed error that
says to run `sdrt build`. backend="auto": TensorRT when TensorRT, cuda-python, a GPU and engines for it are all
there, else ONNX Runtime; deciding never raises.
"""
from __future__ import annotations

from pathlib import Path

from ...errors import EngineNotBuilt, InvalidRequest, SdrtError
from . import cuda
from .store import DEFAULT_ROOT, EngineIdentity, EngineStore, find_store, onnx_digests
from ..manifest import Manifest

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def engines_dir(engines: str | Path | None) -> Path:
    return Path(engines if engines is not None else DEFAULT_ROOT).expanduser()


def gpu_environment():
    """(tensorrt, cuda runtime bindings, GpuInfo); MissingDependency when any is missing."""
    from .trt_engine import import_tensorrt

    trt = import_tensorrt()
    rt = cuda.runtime()
    return trt, rt, cuda.device_info(rt)


def engines_available(bundle: Path, manifest: Manifest, engines: str | Path | None = None) -> bool:
    """True when the store holds engines of every required component for this bundle on this GPU."""
    try:
        trt, _, gpu = gpu_environment()
        store = find_store(engines_dir(engines), Path(bundle), manifest, gpu, trt.__version__)
        if store is None:
            return False
        comps = {(store.read_manifest(k) or {}).get("component") for k in store.built_keys()}
    except (SdrtError, OSError):
        return False
    return set(manifest.required_components) <= comps


def choose_backend(backend: str, bundle: Path, manifest: Manifest, engines: str | Path | None = None) -> str:
    """"onnxruntime" or "tensorrt" for the requested backend."""
    if backend not in BACKENDS:
        raise InvalidRequest(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "tensorrt" if engines_available(bundle, manifest, engines) else "onnxruntime"
    return backend


def _identity(store: EngineStore, manifest: Manifest, key: str, stored: dict) -> EngineIdentity:
    """What the stored engine must match: this bundle's graph files, this GPU and TensorRT. Its shapes are
    its own (they name the engine), so they are taken from its manifest."""
    comp = stored.get("component")
    if comp not in manifest.graphs:
        raise EngineNotBuilt(f"engine {key} in {str(store.dir)!r} is for {comp!r}, which this bundle has not; "
                             f"run `sdrt build {store.bundle}`")
    shapes = tuple((n, tuple(s)) for n, s in (stored.get("shapes") or {}).items())
    return EngineIdentity(key, comp, manifest.source_hash, tuple(onnx_digests(manifest, comp).items()),
                          store.gpu, store.trt_version, shapes)


def load_tensorrt_engines(bundle: Path, manifest: Manifest, engines: str | Path | None = None,
                          use_graph: bool = True):
    """{component: TrtComponent} over every engine built for this bundle and GPU, and the TrtSession that owns
    the device memory (keep it alive as long as the engines; `close()` frees it)."""
    from .trt_engine import TrtComponent, TrtSession

    trt, rt, gpu = gpu_environment()
    bundle = Path(bundle)
    store = EngineStore(engines_dir(engines), bundle, manifest, gpu, trt.__version__)
    hint = (f"run `sdrt build {bundle}` (with --size/--batch for the sizes and batch you generate) on this "
            "machine, or use backend='onnxruntime'")
    found: dict[str, list[str]] = {}
    for key in store.built_keys():
        stored = store.read_manifest(key) or {}
        found.setdefault(stored.get("component"), []).append(key)
    missing = [c for c in manifest.required_components if c not in found]
    if missing:
        raise EngineNotBuilt(f"no TensorRT engines for {', '.join(missing)} of this bundle on this GPU "
                             f"({gpu.name}, TensorRT {trt.__version__}) under {str(store.dir)!r}; {hint}")
    session = TrtSession(trt, rt)
    try:
        comps = {}
        for comp, keys in found.items():
            opened = []
            for key in keys:
                plan, _ = store.load_plan(_identity(store, manifest, key, store.read_manifest(key)))
                opened.append(session.engine(plan, f"{comp} {key}", use_graph))
                del plan  # the host copy of the weights is not needed once deserialized
            comps[comp] = TrtComponent(comp, opened, hint)
        session.activate()
    except BaseException:
        session.close()
        raise
    return comps, session
