"""The bundle manifest `sdrt.json`: what was exported, from what, and the sha256 of every file.

`load_manifest` is the first thing `Pipeline.load` does: a missing or corrupt file, a hash mismatch or an
unknown format version stops it with a typed error before any graph is opened. A folder written by
`optimum-cli export onnx` has no manifest; one is derived from its configs, with a warning.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BundleCorrupt, BundleNotFound, InvalidRequest, UnsupportedBundleVersion
from . import names
from .families import Family, family_of
from .fsutil import sha256_file

FORMAT = "sdrt-bundle"
CONTROLNET_FORMAT = "sdrt-controlnet"  # a ControlNet bundle's manifest (runtime/controlnet.py)
FORMAT_VERSION = 2  # 2: the text encoder takes token embeddings (looked up from token_embeddings) and returns
READABLE_VERSIONS = (1, 2)  # every layer's hidden states; 1: it took input_ids, as optimum's does
REEXPORT = "re-export it with `sdrt export SRC --out BUNDLE`"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, int32
    shape: tuple  # ints are static dims, strings name dynamic ones

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "dynamic": [i for i, s in enumerate(self.shape) if not isinstance(s, int)]}


@dataclass(frozen=True)
class GraphSpec:
    path: str  # relative to the bundle, e.g. "unet/model.onnx"
    inputs: tuple[TensorSpec, ...] = ()  # empty when derived: read from the session instead
    outputs: tuple[TensorSpec, ...] = ()

    @classmethod
    def from_json(cls, d: dict) -> "GraphSpec":
        return cls(d["path"], tuple(map(TensorSpec.from_json, d["inputs"])),
                   tuple(map(TensorSpec.from_json, d["outputs"])))

    def to_json(self) -> dict:
        return {"path": self.path, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}


@dataclass
class Manifest:
    graphs: dict[str, GraphSpec]
    latent_channels: int
    unet_in_channels: int
    vae_scaling_factor: float
    vae_scale_factor: int  # image pixels per latent pixel, 8 for every released SD
    prediction_type: str
    default_height: int
    default_width: int
    text_hidden_size: int
    tokenizer_max_length: int
    tokenizer_pad_id: int
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    token_embeddings: str | None = None  # relative path of the (vocab, D) lookup table, when the graph takes embeddings
    source_hash: str | None = None
    cpu_graphs: dict[str, str] = field(default_factory=dict)  # component -> graph ONNX Runtime's CPU backend opens
    int8_graphs: dict[str, str] = field(default_factory=dict)  # component -> int8 graph, opened only when asked
    # name -> {"component": its U-Net variant in graphs, "file", "sha256": of the .pt, "widths": those it changes},
    # or for a stack "a+b" {"component", "stack": [{"name", "file", "sha256", "widths"}, ...]} in its order
    hypernetworks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The residual inputs of the ControlNet U-Net (graphs["unet-controlnet"]), down 0..N-1 then mid:
    # [{"name", "channels", "level"}], level L: the latent size halved (rounding up) L times. Empty: no such graph.
    residuals: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    family: str = "sd"  # the model family (runtime/families): SD 1.x/2.x, or one registered beside it
    family_settings: dict[str, Any] = field(default_factory=dict)  # what that family alone reads
    hashed: bool = True  # False for a derived (optimum) manifest: nothing was checked

    @property
    def model_family(self) -> Family:
        return family_of(self.family)

    @property
    def required_components(self) -> tuple[str, ...]:
        return self.model_family.required_components

    @property
    def graph_files(self) -> list[tuple[str, str]]:
        """(component, relative path) of every graph: the plain ones, then the CPU and int8 variants."""
        return [(comp, g.path) for comp, g in self.graphs.items()] + list(self.cpu_graphs.items()) + \
            list(self.int8_graphs.items())

    @property
    def model_hash(self) -> str:
        """Short hash written into PNG parameters, as A1111's "Model hash" (10 hex digits)."""
        return (self.source_hash or "unknown")[:10]

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("graphs", "hashed")}
        if self.family == "sd" and not self.family_settings:  # SD bundles read as they did before families
            del d["family"], d["family_settings"]
        for optional in ("hypernetworks", "residuals"):  # bundles without them read as before
            if not d[optional]:
                del d[optional]
        d["graphs"] = {k: g.to_json() for k, g in self.graphs.items()}
        return {"format": FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k not in ("graphs", "hashed") and k in d}
        return cls(graphs={k: GraphSpec.from_json(g) for k, g in d["graphs"].items()}, **fields)


def residual_shapes(residuals: list[dict], rows: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    """ControlNet residual name -> (rows, C, h_L, w_L) for latents of h x w: each level halves the size rounding
    up (a stride-2 convolution with padding 1: ceil(n / 2))."""
    out = {}
    for r in residuals:
        hh, ww = h, w
        for _ in range(int(r["level"])):
            hh, ww = (hh + 1) // 2, (ww + 1) // 2
        out[r["name"]] = (rows, int(r["channels"]), hh, ww)
    return out


def load_manifest(bundle: Path, verify_hashes: bool = True) -> Manifest:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleNotFound(f"bundle {str(bundle)!r} does not exist or is not a folder; "
                             "export one with `sdrt export SRC --out BUNDLE`")
    path = bundle / names.MANIFEST_FILE
    if not path.exists():
        if (bundle / "model_index.json").exists() and (bundle / names.UNET / names.MODEL_FILE).exists():
            return derive_manifest(bundle)
        raise BundleNotFound(f"{str(bundle)!r} is not an sdrt bundle: it has no {names.MANIFEST_FILE} "
                             f"(and no optimum layout with unet/{names.MODEL_FILE}); {REEXPORT}")
    manifest = _parse(path)
    if verify_hashes:
        verify_files(bundle, manifest)
    return manifest


def _parse(path: Path) -> Manifest:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleCorrupt(f"{str(path)!r} is unreadable or not valid JSON ({e}); {REEXPORT}") from None
    if isinstance(raw, dict) and raw.get("format") == CONTROLNET_FORMAT:
        raise InvalidRequest(f"{str(path.parent)!r} is a ControlNet bundle, not a model: load a model bundle and pass "
                            "this one with --controlnet (sdrt.ControlNet.load)")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleCorrupt(f"{str(path)!r} is not an sdrt manifest (expected \"format\": \"{FORMAT}\"); {REEXPORT}")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise UnsupportedBundleVersion(
            f"{str(path)!r} has format version {version!r}, this sdrt reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; "
            f"{REEXPORT} with this sdrt, or install the sdrt that wrote it")
    try:
        manifest = Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleCorrupt(f"{str(path)!r} is missing or has a malformed field ({e!r}); {REEXPORT}") from None
    check_listing(path, manifest)
    return manifest


def check_listing(path: Path, manifest) -> None:
    """Every file the manifest at `path` names lies inside its bundle (no absolute path, no `..`), and it lists a
    graph for each required component. manifest: a Manifest, or a ControlNet bundle's (runtime/controlnet.py:
    files, graph_files, required_components, token_embeddings None)."""
    extra = [manifest.token_embeddings] if manifest.token_embeddings else []
    for rel in [*manifest.files, *(rel for _, rel in manifest.graph_files), *extra]:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleCorrupt(f"{str(path)!r} names the file {rel!r}, outside the bundle; refusing it. {REEXPORT}")
    missing = [c for c in manifest.required_components if c not in manifest.graphs]
    if missing:
        raise BundleCorrupt(f"{str(path)!r} lists no graph for {', '.join(missing)}; {REEXPORT}")


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists and matches its sha256, and every graph is listed (also for a
    ControlNet bundle's manifest)."""
    for rel, digest in sorted(manifest.files.items()):
        f = bundle / rel
        if not f.is_file():
            raise BundleCorrupt(f"bundle file {str(f)!r} is missing; {REEXPORT}")
        if sha256_file(f) != digest:
            raise BundleCorrupt(f"bundle file {str(f)!r} does not match its sha256 in {names.MANIFEST_FILE} "
                                f"(corrupt or modified); {REEXPORT}")
    if manifest.token_embeddings and manifest.token_embeddings not in manifest.files:
        raise BundleCorrupt(f"{manifest.token_embeddings} is not hashed in {names.MANIFEST_FILE}; {REEXPORT}")
    for comp, rel in manifest.graph_files:
        if rel not in manifest.files:
            raise BundleCorrupt(f"graph {comp} ({rel}) is not hashed in {names.MANIFEST_FILE}; {REEXPORT}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BundleCorrupt(f"{str(path)!r} is missing or not valid JSON ({e}); the folder is incomplete") from None


def derive_manifest(bundle: Path) -> Manifest:
    """A manifest for a folder written by optimum: read from its configs, nothing hashed."""
    warnings.warn(f"{str(bundle)!r} has no {names.MANIFEST_FILE} (an optimum export?): its configuration was "
                  "derived from its files and nothing was hashed", stacklevel=3)
    from .tokenizer import read_pad_id  # local: tokenizer imports manifest for its error text

    unet = read_json(bundle / names.UNET / "config.json")
    vae = read_json(bundle / names.VAE_DECODER / "config.json")
    text = read_json(bundle / names.TEXT_ENCODER / "config.json")
    sched_path = bundle / "scheduler" / "scheduler_config.json"
    sched = read_json(sched_path) if sched_path.exists() else {}
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    size = int(unet.get("sample_size", 64)) * scale
    graphs = {c: GraphSpec(f"{c}/{names.MODEL_FILE}") for c in names.COMPONENTS
              if (bundle / c / names.MODEL_FILE).exists()}
    return Manifest(
        graphs=graphs,
        latent_channels=int(vae.get("latent_channels", 4)),
        unet_in_channels=int(unet.get("in_channels", 4)),
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        vae_scale_factor=scale,
        prediction_type=sched.get("prediction_type", "epsilon"),
        default_height=size, default_width=size,
        text_hidden_size=int(text.get("hidden_size", 768)),
        tokenizer_max_length=int(text.get("max_position_embeddings", 77)),
        tokenizer_pad_id=read_pad_id(bundle / "tokenizer"),
        hashed=False,
    )
