"""ControlNet bundles, the runtime's side: `ControlNet.load(CN_BUNDLE)` and the `Control` a request passes.

A ControlNet bundle (sdrt export of a diffusers ControlNetModel folder or a single-file ControlNet) is a folder of
its own: controlnet/model.onnx (+ model.cpu.onnx for ONNX Runtime's CPU backend) and the manifest sdrt.json
(format "sdrt-controlnet"), which records the base model family and text width it fits and its residuals. The
graph takes the U-Net's latents, timestep and text with the control image, (B, 3, H, W) RGB in [0, 1], and
returns the residuals unscaled: the weight, guess mode's ramp and guidance start/end are applied in numpy
(runtime/controls.py), so one graph serves every setting.

Reference: diffusers' ControlNetModel and StableDiffusionControlNetPipeline.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleCorrupt, BundleNotFound, InvalidRequest, UnsupportedBundleVersion
from . import names
from .manifest import CONTROLNET_FORMAT, GraphSpec, Manifest, check_listing, verify_files

FORMAT_VERSION = 1
REEXPORT = "re-export it with `sdrt export CONTROLNET_SRC --out CN_BUNDLE`"


@dataclass
class ControlNetManifest:
    name: str  # the source's name (folder or file stem): what PNG parameters call the model
    base_family: str  # the model family it fits ("sd")
    text_width: int  # the cross-attention width it reads: 768 SD 1.x, 1024 SD 2.x
    in_channels: int  # latent channels it takes (4)
    image_scale: int  # control image pixels per latent pixel (8)
    residuals: list[dict[str, Any]]  # [{"name", "channels", "level"}], down 0..N-1 then mid, as the U-Net's
    graphs: dict[str, GraphSpec]
    cpu_graphs: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    source_hash: str | None = None
    global_pool_conditions: bool = False  # shuffle-type nets: residuals mean-pooled, guess mode forced
    bgr: bool = False  # controlnet_conditioning_channel_order "bgr": the image's channels are flipped
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    hashed = True  # what the engine store asks of a manifest (a model bundle's may be derived, unhashed)
    required_components = (names.CONTROLNET,)
    token_embeddings = None  # (a model bundle's lookup table; manifest.verify_files asks)

    @property
    def graph_files(self) -> list[tuple[str, str]]:
        return [(c, g.path) for c, g in self.graphs.items()] + list(self.cpu_graphs.items())

    @property
    def short_hash(self) -> str:
        return (self.source_hash or "unknown")[:8]  # A1111's ControlNet model list: "name [8 hex]"

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "graphs"}
        return {"format": CONTROLNET_FORMAT, **d, "graphs": {k: g.to_json() for k, g in self.graphs.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "ControlNetManifest":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k != "graphs" and k in d}
        return cls(graphs={k: GraphSpec.from_json(g) for k, g in d["graphs"].items()}, **fields)


def load_controlnet_manifest(path: Path) -> ControlNetManifest:
    """The manifest of a ControlNet bundle, every file's hash checked; typed errors otherwise."""
    path = Path(path).expanduser()
    file = path / names.MANIFEST_FILE
    if not file.is_file():
        raise BundleNotFound(f"{str(path)!r} is not a ControlNet bundle (no {names.MANIFEST_FILE}); export one with "
                             "`sdrt export CONTROLNET_SRC --out CN_BUNDLE`")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleCorrupt(f"{str(file)!r} is unreadable or not valid JSON ({e}); {REEXPORT}") from None
    if not isinstance(raw, dict) or raw.get("format") != CONTROLNET_FORMAT:
        raise InvalidRequest(f"{str(path)!r} is not a ControlNet bundle (it is a model bundle, or something else): "
                             "give one written by `sdrt export CONTROLNET_SRC --out CN_BUNDLE`")
    if raw.get("format_version") != FORMAT_VERSION:
        raise UnsupportedBundleVersion(f"{str(file)!r} has ControlNet format version {raw.get('format_version')!r}; "
                                       f"this sdrt reads {FORMAT_VERSION}: {REEXPORT}")
    try:
        manifest = ControlNetManifest.from_json(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleCorrupt(f"{str(file)!r} is missing or has a malformed field ({e!r}); {REEXPORT}") from None
    check_listing(file, manifest)  # (a manifest without its graph was an internal error at load)
    verify_files(path, manifest)  # the model bundle's checks, on the same fields
    return manifest


class ControlNet:
    """A loaded ControlNet bundle: `net(sample, timestep, text, image)` -> {residual name: array}."""

    def __init__(self, path: Path, manifest: ControlNetManifest, engine, backend: str = "onnxruntime",
                 session=None):
        self.path, self.manifest, self.engine, self.backend = path, manifest, engine, backend
        self.session = session  # TensorRT: the TrtSession owning the engines' device memory
        self.name = manifest.name

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, backend: str = "auto",
             engines: str | Path | None = None) -> "ControlNet":
        """backend: "onnxruntime" (the CPU), "tensorrt" (engines `sdrt build BUNDLE --controlnet CN_BUNDLE` made
        for this GPU, in `engines`, default ./engines) or "auto" (TensorRT when such engines exist)."""
        from .engines import OrtEngine, choose_backend, load_tensorrt_engines  # here: the heavy import

        path = Path(path).expanduser()
        manifest = load_controlnet_manifest(path)
        backend = choose_backend(backend, path, manifest, engines)
        if backend == "tensorrt":
            opened, session = load_tensorrt_engines(path, manifest, engines)
            engine, where = opened[names.CONTROLNET], "its TensorRT engine"
        else:
            rel = manifest.cpu_graphs.get(names.CONTROLNET, manifest.graphs[names.CONTROLNET].path)
            engine, session, where = OrtEngine(path / rel, names.CONTROLNET, threads), None, repr(str(path / rel))
        want = {r["name"] for r in manifest.residuals}
        if not want <= set(engine.outputs) or names.CONTROLNET_COND not in engine.inputs:
            if session is not None:
                session.close()
            raise BundleCorrupt(f"the ControlNet graph ({where}) does not match {names.MANIFEST_FILE}; {REEXPORT}")
        return cls(path, manifest, engine, backend, session)

    def check_fits(self, bundle: Manifest, bundle_name: str) -> None:
        """Refuse a ControlNet made for another base model, naming both."""
        check_fits(self.manifest, bundle, bundle_name)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray, image: np.ndarray) -> dict:
        out = self.engine(**{names.SAMPLE: sample, names.TIMESTEP: timestep, names.ENCODER_HIDDEN_STATES: text,
                             names.CONTROLNET_COND: image})
        # (global_pool_conditions nets pool inside the graph, as diffusers' forward does: (B, C, 1, 1) residuals)
        return {r["name"]: np.asarray(out[r["name"]], np.float32) for r in self.manifest.residuals}


def check_fits(m: ControlNetManifest, bundle: Manifest, bundle_name: str) -> None:
    """Refuse ControlNet `m` for a model bundle of another base model (family, text width, residuals), naming both."""
    text = {768: "SD 1.x", 1024: "SD 2.x"}
    ours, theirs = m.residuals, bundle.residuals
    if m.in_channels != bundle.latent_channels:  # a net sees the latents, never an inpainting U-Net's extra channels
        raise InvalidRequest(f"ControlNet {m.name!r} takes {m.in_channels}-channel latents; {bundle_name!r} has "
                             f"{bundle.latent_channels}: use a ControlNet made for its base model")
    if m.image_scale != bundle.vae_scale_factor:  # its hint embedding must shrink the image as the VAE does
        raise InvalidRequest(f"ControlNet {m.name!r} reads control images at {m.image_scale}x its latents; "
                             f"{bundle_name!r}'s VAE works at {bundle.vae_scale_factor}x: use a ControlNet made for it")
    if m.base_family != bundle.family or m.text_width != bundle.text_hidden_size or ours != theirs:
        raise InvalidRequest(
            f"ControlNet {m.name!r} was made for a {m.base_family} model with {m.text_width}-wide text "
            f"({text.get(m.text_width, 'an unusual width')}) and {len(ours)} residuals of "
            f"{sorted({r['channels'] for r in ours})} channels; {bundle_name!r} is a {bundle.family} model with "
            f"{bundle.text_hidden_size}-wide text ({text.get(bundle.text_hidden_size, 'an unusual width')}) and "
            f"{len(theirs)} of {sorted({r['channels'] for r in theirs})}: use a ControlNet trained for that model "
            "(a bundle exported before ControlNet: `sdrt controlnet prepare` it first)")


@dataclass(frozen=True)
class Control:
    """One ControlNet in a request: its net, the control image (path, PIL or uint8 array; resized to the
    generation size), weight (diffusers' controlnet_conditioning_scale), and the fraction of the steps it acts on
    (diffusers' control_guidance_start/end). preprocess: None (the image is the control map), "canny"
    (OpenCV's edges, thresholds canny_low/canny_high, as A1111's extension), "invert", or "depth" (the model
    bundle's own depth estimator; runtime/preprocess.py). mode: A1111's control mode, "Balanced", "My prompt is more
    important" or "ControlNet is more important" (runtime/controls.py)."""

    net: ControlNet
    image: Any
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str | None = None
    canny_low: int = 100
    canny_high: int = 200
    mode: str = "Balanced"  # A1111's control mode (runtime/controls.py: CONTROL_MODES)
