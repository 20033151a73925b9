"""The bundles a server serves, by name. Clients name a model by A1111's title ("name [hash]"), its model_name or
its hash; the name is looked up among the served bundles and never opened as a path."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotServed
from ..runtime import lora as _lora
from ..runtime.manifest import load_manifest
from ..runtime.pipeline import Pipeline

EMBEDDED_NAME = "sdrt-embedded"


@dataclass(frozen=True)
class Titled:
    name: str  # the bundle folder's name
    path: Path | None
    hash: str  # A1111's short hash: 10 hex digits for models, 8 for ControlNets

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"


@dataclass(frozen=True)
class Served(Titled):
    sha256: str = ""
    width: int = 512  # the bundle's default size
    height: int = 512


def lookup(items: list, wanted, what: str, hint: str):
    """A title, a name, a title without its hash, or a hash -> the item; a typed refusal naming the served ones."""
    key = str(wanted).strip()
    for item in items:
        if key in (item.title, item.name, item.hash, getattr(item, "sha256", None)) or key.split(" [")[0] == item.name:
            return item
    served = ", ".join(i.title for i in items) or "none"
    raise ModelNotServed(f"{what} {key[:200]!r} is not served here; served: {served} ({hint})")


def served_nets(paths) -> list[Titled]:
    """ControlNet bundles requests may name (serve/controlnet_units.py)."""
    from ..runtime.controlnet import load_controlnet_manifest

    return [Titled(Path(p).resolve().name, Path(p), load_controlnet_manifest(Path(p)).short_hash) for p in paths]


@dataclass(frozen=True)
class LoadOptions:
    backend: str = "auto"
    engines: Path = Path("engines")
    threads: int | None = None
    lora_dirs: tuple[Path, ...] = ()
    embeddings: tuple[Path, ...] = ()
    controlnets: tuple[Path, ...] = ()  # ControlNet bundles requests may name (serve/controlnet_units.py)


class ModelSet:
    """The served bundles' identities (cheap: manifests only); `open_all` loads one Pipeline of each."""

    def __init__(self, bundles: list[Path], options: LoadOptions = LoadOptions()):
        from .. import embedded

        self.options = options
        self.models: list[Served] = []
        for path in bundles or [None]:
            manifest = load_manifest(Path(embedded.BUNDLE if path is None else path), verify_hashes=False)
            name = EMBEDDED_NAME if path is None else Path(path).resolve().name
            if any(m.name == name for m in self.models):
                raise ModelNotServed(f"two served bundles are both named {name!r}; give each folder its own name")
            full = manifest.source_hash or ""
            self.models.append(Served(name, None if path is None else Path(path), manifest.model_hash, full,
                                      manifest.default_width, manifest.default_height))
        self.default = self.models[0]
        self.nets = served_nets(options.controlnets)

    def find(self, wanted: str | None) -> Served:
        """A title, model_name, title without the hash, or hash -> the served model."""
        if wanted is None or wanted == "":
            return self.default
        return lookup(self.models, wanted, "model", "sdrt serve --model BUNDLE adds one")

    def open_all(self) -> dict[str, Pipeline]:
        o = self.options
        pipes = {}
        for m in self.models:
            pipe = Pipeline.load(m.path, backend=o.backend, threads=o.threads, engines=o.engines)
            pipe.lora_dirs = list(o.lora_dirs)
            for emb in o.embeddings:
                pipe.load_embedding(emb)
            pipes[m.name] = pipe
        return pipes

    def open_nets(self) -> dict:
        from ..runtime.controlnet import ControlNet

        o = self.options
        return {n.name: ControlNet.load(n.path, o.threads, o.backend, o.engines) for n in self.nets}

    def loras(self) -> list[dict]:
        seen = {}
        for folder in self.options.lora_dirs:
            for name, path in _lora.listing(folder).items():
                seen.setdefault(name, {"name": name, "alias": name, "path": path.name, "metadata": {}})
        return list(seen.values())
