"""`sdrt build`: TensorRT engines for a bundle on this GPU, stored in the engine store.

One engine per shape (see sdrt.runtime.engines.trt_profiles), each with one static optimization profile. Precision:
TensorRT >= 10 builds strongly typed networks (weak typing is deprecated from 10.12 and gone in 11), so for
fp16 the graph itself is converted to fp16 first (sdrt.export.passes.fp16) and parsed into a STRONGLY_TYPED network;
TensorRT < 10 gets the fp32 graph and the FP16 builder flag. The VAE is checked after its fp16 build and
rebuilt in fp32 when its output on a check input is not finite (SD's VAE decoder overflows fp16 on some
checkpoints). One timing cache per GPU key speeds up later builds; an unreadable one is ignored with a warning.

TensorRT Python API used (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/):
Builder.create_network(flags), NetworkDefinitionCreationFlag.STRONGLY_TYPED, OnnxParser.parse_from_file,
Builder.create_builder_config, IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes),
create_timing_cache / set_timing_cache / get_timing_cache().serialize(), Builder.create_optimization_profile,
IOptimizationProfile.set_shape(name, min, opt, max), Builder.build_serialized_network(network, config).
"""
from __future__ import annotations

import hashlib
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import BuildFailed, DeviceOutOfMemory, MissingDependency
from ..runtime import names
from ..runtime.engines import cuda
from ..runtime.engines.store import EngineStore, engine_manifest
from ..runtime.manifest import load_manifest
from ..runtime.engines.trt_backend import engines_dir as resolve_engines_dir
from ..runtime.engines.trt_profiles import EngineSpec, controlnet_specs, default_sizes, engine_specs

VAE_COMPONENTS = (names.VAE_DECODER, names.VAE_ENCODER)


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def network_flags(trt) -> tuple[int, bool]:
    """(create_network flags, strongly typed?). STRONGLY_TYPED is required on 10.x for typed fp16 graphs and
    accepted (ignored, always on) by 11.x; TensorRT < 10 has no such flag: weakly typed with builder flags."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if trt_major(trt) >= 10 and flag is not None:
        return 1 << int(flag), True
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # required before 10
    return (1 << int(explicit) if explicit is not None else 0), False


def build_error(name: str, errors: list[str], free: int, total: int) -> Exception:
    """The typed error for a build that returned no plan, from TensorRT's logged errors."""
    said = "; ".join(errors[-3:]) or "no error was logged"
    if any("out of memory" in e.lower() or "outofmemory" in e.lower() or "cudaErrorMemoryAllocation" in e
           for e in errors):
        return DeviceOutOfMemory(f"building {name} ran out of GPU memory ({free / 2**30:.2f} GiB free of "
                                 f"{total / 2**30:.2f} GiB): use a smaller --workspace or --batch, or close other "
                                 f"programs using the GPU ({said})")
    return BuildFailed(f"TensorRT could not build {name}: {said}")


def _timing_cache(config, data: bytes | None, source: str):
    """The builder's timing cache from `data`; an unreadable one is replaced by an empty one, with a warning."""
    if data:
        try:
            cache = config.create_timing_cache(data)
            if cache is not None:
                return cache, "reused"
        except Exception as e:  # noqa: BLE001 - TensorRT raises its own types for a corrupt cache
            warnings.warn(f"timing cache {source} is unreadable by this TensorRT ({e}); building without it")
        else:
            warnings.warn(f"timing cache {source} is unreadable by this TensorRT; building without it")
    return config.create_timing_cache(b""), "new"


def trt_build(trt, rt, onnx_path: Path, spec: EngineSpec, fp16: bool, workspace_gb: float | None,
              cache: bytes | None, cache_source: str, log) -> tuple[object, bytes, dict]:
    """Build one engine: (serialized plan, updated timing cache, build options for the manifest)."""
    from ..runtime.engines.trt_engine import make_logger

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags, strongly_typed = network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves model.onnx_data beside the graph
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildFailed(f"TensorRT's ONNX parser refused {onnx_path}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT < 10: weakly typed, precision by flag
    if not fp16 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls would cost accuracy
    profile, shapes = builder.create_optimization_profile(), spec.input_shapes
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if -1 in tuple(tensor.shape):  # only dynamic axes take a profile; min = opt = max: a static engine
            shape = shapes[tensor.name]
            profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    timing, cache_state = _timing_cache(config, cache, cache_source)
    config.set_timing_cache(timing, False)  # ignore_mismatch=False: entries of another GPU are not used
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        free, total = cuda.mem_info_or_none(rt)
        raise build_error(spec.key, logger.errors, free, total)
    log(f"{spec.key}: built in {time.perf_counter() - started:.0f}s")
    options = {"workspace_gb": workspace_gb, "strongly_typed": strongly_typed,
               "fp16_graph": fp16 and strongly_typed, "tf32": bool(fp16 and hasattr(trt.BuilderFlag, "TF32")),
               "timing_cache": cache_state, "seconds": round(time.perf_counter() - started, 1)}
    return plan, bytes(config.get_timing_cache().serialize()), options


def check_input(manifest, spec: EngineSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed input for the VAE's finiteness check: latents as the sampler leaves them (std ~ 1/scaling
    factor), or an image in [-1, 1]."""
    rng = np.random.default_rng(seed)
    (name, shape), = spec.shapes
    if spec.component == names.VAE_DECODER:
        return {name: (rng.standard_normal(shape) / manifest.vae_scaling_factor).astype(np.float32)}
    return {name: rng.uniform(-1, 1, shape).astype(np.float32)}


def outputs_finite(trt, rt, plan, name: str, feeds: dict[str, np.ndarray]) -> bool:
    from ..runtime.engines.trt_engine import TrtSession

    session = TrtSession(trt, rt)
    try:
        engine = session.engine(plan, name, use_graph=False)
        session.activate()
        return all(np.isfinite(v).all() for v in engine(**feeds).values())
    finally:
        session.close()


class _Builder:
    """The state of one `sdrt build`: the fp16 graphs converted so far and the timing cache."""

    def __init__(self, trt, rt, bundle: Path, manifest, store: EngineStore, scratch: Path, workspace_gb, chunks, log):
        self.trt, self.rt, self.bundle, self.manifest, self.store = trt, rt, bundle, manifest, store
        self.scratch, self.workspace_gb, self.chunks, self.log = scratch, workspace_gb, chunks, log
        self.graphs: dict[tuple[str, bool], Path] = {}
        self.cache = store.read_timing_cache()

    def graph(self, component: str, fp16: bool) -> Path:
        """The ONNX graph to parse: the bundle's, or its fp16 conversion (made once per component)."""
        rel = self.manifest.graphs[component].path
        src, data_dir = self.bundle / rel, self.bundle / names.data_dir(rel)
        convert = fp16 and network_flags(self.trt)[1]
        if not convert and data_dir == src.parent:
            return src  # the parser reads model.onnx_data beside it
        if (component, fp16) not in self.graphs:
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise MissingDependency("fp16 engines for TensorRT >= 10 convert the graph to fp16 first, which "
                                        "needs onnx: pip install onnx (or build with --precision fp32)") from None
            from .passes.fp16 import convert_file

            self.log(f"{component}: " + ("converting the graph to fp16 for a strongly typed network" if convert
                                         else "gathering the graph's weights beside it for the parser"))
            self.graphs[(component, fp16)] = convert_file(src, self.scratch / component, data_dir, convert)
        return self.graphs[(component, fp16)]

    def build(self, spec: EngineSpec, fp16: bool):
        plan, self.cache, options = trt_build(self.trt, self.rt, self.graph(spec.component, fp16), spec, fp16,
                                              self.workspace_gb, self.cache, str(self.store.dir / "timing.cache"),
                                              self.log)
        self.store.write_timing_cache(self.cache)  # after every engine: a later failure keeps what was learnt
        return plan, options

    def __call__(self, spec: EngineSpec):
        """-> (plan, manifest) for store.ensure."""
        fp16 = spec.precision == "fp16"
        plan, options = self.build(spec, fp16)
        precision = spec.precision
        if fp16 and spec.component in VAE_COMPONENTS and \
                not outputs_finite(self.trt, self.rt, plan, spec.key, check_input(self.manifest, spec)):
            warnings.warn(f"{spec.key}: fp16 gives non-finite values on the check input; building it in fp32")
            plan, options = self.build(spec, False)
            precision = "fp32"
        view = memoryview(plan)
        m = engine_manifest(self.store.identity(spec), hashlib.sha256(view).hexdigest(), view.nbytes, precision,
                            spec.precision, {**options, "chunks": self.chunks})
        return plan, m


def build_engines(bundle, sizes=None, batch: int = 1, precision: str = "fp16", engines_dir=None,
                  workspace_gb: float | None = None, log=print, chunks: int = 1, hypernetworks=(),
                  controlnets=()) -> list[dict]:
    """Build (or reuse) every engine the bundle needs for `sizes` [(h, w)] (default: the bundle's own size:
    512 for SD 1.x, 768 for SD 2.x v-prediction), image batch `batch`, prompts up to 77·`chunks` tokens, the
    U-Net variants of the named `hypernetworks`, and with `controlnets` (ControlNet bundles) the U-Net that takes
    their residuals and each ControlNet's engines at the same shapes (stored under the ControlNet bundle's hash).
    Returns the engines' manifests."""
    from ..doctor import build_preflight
    from ..runtime.controlnet import check_fits, load_controlnet_manifest

    trt, rt, gpu = build_preflight()
    bundle = Path(bundle).expanduser()
    manifest = load_manifest(bundle)  # hashes checked: engines are tied to these exact graph files
    sizes = sizes or default_sizes(manifest)
    nets = [(Path(p).expanduser(), load_controlnet_manifest(p)) for p in controlnets]
    for path, cn in nets:
        check_fits(cn, manifest, bundle.name)
    jobs = [(bundle, manifest, engine_specs(manifest, sizes, batch, precision, chunks, hypernetworks, bool(nets)))]
    jobs += [(path, cn, controlnet_specs(cn, manifest, sizes, batch, precision, chunks)) for path, cn in nets]
    results = []
    for folder, m, specs in jobs:  # a ControlNet's engines: its own store, named by its own hash
        results += _build_all(trt, rt, gpu, folder, m, specs, engines_dir, workspace_gb, chunks, log)
    return results


def _build_all(trt, rt, gpu, bundle: Path, manifest, specs, engines_dir, workspace_gb, chunks, log) -> list[dict]:
    store = EngineStore(resolve_engines_dir(engines_dir), bundle, manifest, gpu, trt.__version__)
    store.dir.mkdir(parents=True, exist_ok=True)
    log(f"building {len(specs)} engines for {gpu.name} (sm {gpu.compute_capability}, TensorRT {trt.__version__}) "
        f"in {store.dir}")
    results = []
    with tempfile.TemporaryDirectory(prefix=".fp16-", dir=store.dir) as scratch:
        builder = _Builder(trt, rt, bundle, manifest, store, Path(scratch), workspace_gb, chunks, log)
        for spec in specs:
            m, built = store.ensure(store.identity(spec), lambda spec=spec: builder(spec), log)
            if not built:
                log(f"{spec.key}: up to date, reused")
            results.append(m)
    return results
