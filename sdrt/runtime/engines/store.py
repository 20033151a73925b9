"""The engine store: `engines/<model hash>/<gpu key>/<engine key>.plan` + `.json`. Pure Python: no GPU.

A TensorRT plan runs only on the GPU model and TensorRT version that built it, and only matches the graph it
was built from, so each plan has a manifest beside it naming all three (and the plan's sha256). The manifest
is written last, after the plan is complete, fsynced and renamed into place: a build that dies leaves at
most a temp file or a plan without a manifest, and neither ever loads. A lock file per engine (flock) makes a
second build of the same engine wait for the first and then reuse its result.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ... import __version__
from ...errors import EngineNotBuilt, StaleEngine
from ..fsutil import atomic_write_bytes, exclusive_lock, sha256_file
from .. import names
from ..manifest import Manifest


FORMAT = "sdrt-engine"
FORMAT_VERSION = 1
DEFAULT_ROOT = Path("engines")
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class GpuInfo:
    name: str  # as CUDA reports it, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    driver: str = "unknown"  # e.g. "550.54.15" or CUDA's 12040
    total_memory: int = 0  # bytes


def sanitize(text: str) -> str:
    """Lower-case, runs of anything but letters, digits and dots become one '-': safe as a folder name."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def gpu_key(gpu: GpuInfo, trt_version: str) -> str:
    """e.g. nvidia-h100-80gb-hbm3_sm90_trt10.8.0.43: the plans of one GPU model and TensorRT version."""
    sm = gpu.compute_capability.replace(".", "")
    return f"{sanitize(gpu.name)}_sm{sanitize(sm)}_trt{sanitize(trt_version)}"


def model_hash(manifest: Manifest, bundle: Path) -> str:
    if not manifest.source_hash or not manifest.hashed:
        raise EngineNotBuilt(f"bundle {str(bundle)!r} has no source hash (an optimum export?), so its engines "
                             "cannot be told apart from another model's; re-export it with `sdrt export`")
    return manifest.source_hash[:16]


def onnx_digests(manifest: Manifest, component: str) -> dict[str, str]:
    """sha256 of the component's graphs and external weights, from the (verified) bundle manifest: the files
    of its data folder (its component's), and for a U-Net variant in a subfolder (unet/hypernet/NAME.onnx) its
    own graphs and weights there, so adding or removing a hypernetwork leaves the other engines valid. The
    manifest may also be a ControlNet bundle's (runtime/controlnet.py: the same graphs, files and hashes)."""
    graph = manifest.graphs[component].path
    data = names.data_dir(graph)
    own = {graph, manifest.cpu_graphs.get(component), graph.removesuffix(".onnx") + ".onnx_data"}
    # The ControlNet U-Net's graphs lie beside the U-Net's but are its own: adding them (`sdrt controlnet prepare`)
    # leaves the other engines valid.
    others = {rel for comp, rel in manifest.graph_files if comp == names.UNET_CONTROLNET} - own
    return {rel: digest for rel, digest in sorted(manifest.files.items())
            if rel in own or (rel.rsplit("/", 1)[0] == data and rel.endswith((".onnx", ".onnx_data"))
                              and rel not in others)}


@dataclass(frozen=True)
class EngineIdentity:
    """What an engine must have been built from and for; its manifest is checked against this."""

    key: str
    component: str
    bundle_hash: str  # the bundle's full source hash
    onnx: tuple[tuple[str, str], ...]  # (relative path, sha256) of the graph files
    gpu: GpuInfo
    trt_version: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    def mismatches(self, m: dict) -> list[str]:
        """Human-readable differences between a stored manifest and this identity (empty: it matches)."""
        gpu = m.get("gpu") or {}
        checks = [
            ("format", f"{m.get('format')} v{m.get('format_version')}", f"{FORMAT} v{FORMAT_VERSION}"),
            ("engine", m.get("key"), self.key),
            ("GPU", gpu.get("name"), self.gpu.name),
            ("compute capability", gpu.get("compute_capability"), self.gpu.compute_capability),
            ("TensorRT", m.get("tensorrt"), self.trt_version),
            ("bundle", (m.get("bundle") or {}).get("source_hash"), self.bundle_hash),
            ("graph files", (m.get("bundle") or {}).get("onnx"), dict(self.onnx)),
            ("shapes", m.get("shapes"), {k: list(v) for k, v in self.shapes}),
        ]
        return [f"{what} {got!r} (this machine/bundle: {want!r})" for what, got, want in checks if got != want]


def engine_manifest(identity: EngineIdentity, plan_sha256: str, plan_bytes: int, precision: str,
                    requested_precision: str, build: dict) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": identity.key, "component": identity.component,
        "precision": precision, "requested_precision": requested_precision,
        "shapes": {k: list(v) for k, v in identity.shapes},
        "bundle": {"source_hash": identity.bundle_hash, "onnx": dict(identity.onnx)},
        "tensorrt": identity.trt_version, "gpu": asdict(identity.gpu), "build": build,
        "plan": {"file": f"{identity.key}.plan", "sha256": plan_sha256, "bytes": plan_bytes},
        "sdrt": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class EngineStore:
    """The folder of one bundle's engines for one GPU model and TensorRT version."""

    def __init__(self, root: Path, bundle: Path, manifest: Manifest, gpu: GpuInfo, trt_version: str):
        self.root, self.bundle, self.manifest = Path(root), Path(bundle), manifest
        self.gpu, self.trt_version = gpu, trt_version
        self.dir = self.root / model_hash(manifest, self.bundle) / gpu_key(gpu, trt_version)

    def identity(self, spec) -> EngineIdentity:
        """spec: a trt_profiles.EngineSpec."""
        return EngineIdentity(spec.key, spec.component, self.manifest.source_hash,
                              tuple(onnx_digests(self.manifest, spec.component).items()), self.gpu,
                              self.trt_version, spec.shapes)

    def plan_path(self, key: str) -> Path:
        return self.dir / f"{key}.plan"

    def manifest_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def _rebuild_hint(self) -> str:
        return f"run `sdrt build {self.bundle}` on this machine to build engines for it"

    # -- reading ---------------------------------------------------------------------------------------
    def read_manifest(self, key: str) -> dict | None:
        """The stored manifest, or None when there is none (never built, or a build died before the end)."""
        path = self.manifest_path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StaleEngine(f"engine manifest {str(path)!r} is unreadable ({e}); {self._rebuild_hint()}") from None
        if not isinstance(data, dict):
            raise StaleEngine(f"engine manifest {str(path)!r} is not a JSON object; {self._rebuild_hint()}")
        return data

    def check(self, identity: EngineIdentity) -> dict:
        """The engine's manifest if it matches `identity`; else EngineNotBuilt / StaleEngine saying why."""
        m = self.read_manifest(identity.key)
        if m is None:
            raise EngineNotBuilt(f"no TensorRT engine {identity.key} for this bundle on this GPU "
                                 f"({self.gpu.name}, TensorRT {self.trt_version}) in {str(self.dir)!r}; "
                                 f"{self._rebuild_hint()}")
        wrong = identity.mismatches(m)
        if wrong:
            raise StaleEngine(f"engine {str(self.plan_path(identity.key))!r} does not match: "
                              f"{'; '.join(wrong)}; {self._rebuild_hint()}")
        return m

    def load_plan(self, identity: EngineIdentity) -> tuple[bytes, dict]:
        """The plan's bytes and manifest, after checking both (a plan whose sha256 is wrong is refused)."""
        m = self.check(identity)
        path = self.plan_path(identity.key)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StaleEngine(f"engine plan {str(path)!r} is unreadable ({e.strerror or e}); "
                              f"{self._rebuild_hint()}") from None
        if hashlib.sha256(data).hexdigest() != (m.get("plan") or {}).get("sha256"):
            raise StaleEngine(f"engine plan {str(path)!r} does not match the sha256 in its manifest (corrupt or "
                              f"replaced); {self._rebuild_hint()}")
        return data, m

    def is_valid(self, identity: EngineIdentity) -> bool:
        """Manifest matches and the plan's hash is right (reads the plan)."""
        try:
            self.check(identity)
            return sha256_file(self.plan_path(identity.key)) == self.read_manifest(identity.key)["plan"]["sha256"]
        except (EngineNotBuilt, OSError, KeyError, TypeError):
            return False

    def built_keys(self) -> list[str]:
        """Engine keys with a manifest here (not checked)."""
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json") if not p.name.startswith("."))

    # -- writing ---------------------------------------------------------------------------------------
    def save(self, key: str, plan, manifest: dict) -> None:
        """Plan first (temp, fsync, rename), manifest last: a reader never sees a manifest without its plan."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path(key).unlink(missing_ok=True)  # an old manifest must not vouch for the new plan mid-write
        atomic_write_bytes(self.plan_path(key), plan)
        _write_manifest(self.manifest_path(key), manifest)

    def clean_leftovers(self, key: str) -> list[Path]:
        """Temp files of builds of `key` that died; call with the engine's lock held (so none is live)."""
        gone = []
        for pattern in (f".{key}.plan.*.tmp", f".{key}.json.*.tmp"):
            for p in self.dir.glob(pattern):
                p.unlink(missing_ok=True)
                gone.append(p)
        return gone

    def lock(self, name: str, log: Callable[[str], None] = lambda _: None):
        """An exclusive flock on `.<name>.lock` (fsutil.exclusive_lock): a killed build never blocks the next one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return exclusive_lock(self.dir / f".{name}.lock",
                              on_wait=lambda: log(f"{name}: another build of this engine is running; waiting for it"))

    def ensure(self, identity: EngineIdentity, build: Callable[[], tuple[object, dict]],
               log: Callable[[str], None] = lambda _: None) -> tuple[dict, bool]:
        """The engine for `identity`: reused when a valid one is stored, else built by `build()` -> (plan bytes,
        manifest) and saved. Returns (manifest, built). Concurrent callers for one key build it once."""
        with self.lock(identity.key, log):
            if self.is_valid(identity):
                return self.read_manifest(identity.key), False
            self.clean_leftovers(identity.key)
            plan, manifest = build()
            self.save(identity.key, plan, manifest)
            return manifest, True

    # -- the timing cache ------------------------------------------------------------------------------
    def read_timing_cache(self) -> bytes | None:
        """The GPU's timing cache, or None (with a warning when it exists but can't be read)."""
        path = self.dir / TIMING_CACHE
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            warnings.warn(f"timing cache {str(path)!r} is unreadable ({e.strerror or e}); building without it")
            return None

    def write_timing_cache(self, data) -> None:
        with self.lock(TIMING_CACHE):
            atomic_write_bytes(self.dir / TIMING_CACHE, data)


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def find_store(root: Path, bundle: Path, manifest: Manifest, gpu: GpuInfo, trt_version: str) -> EngineStore | None:
    """The store for this bundle and GPU when it holds any engine, else None (for backend="auto")."""
    try:
        store = EngineStore(root, bundle, manifest, gpu, trt_version)
    except EngineNotBuilt:
        return None
    return store if store.built_keys() else None
