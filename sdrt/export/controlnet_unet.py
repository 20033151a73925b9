"""The U-Net variant that takes ControlNet residuals, in a bundle: written by every export, and by
`sdrt controlnet prepare BUNDLE` into a bundle exported before (passes/residuals.py edits the graphs).

    unet/model.controlnet.onnx      the plain graph plus the residual inputs (TensorRT builds from it)
    unet/model.controlnet.cpu.onnx  the CPU graph alike, when the bundle has one

Both read the U-Net's unet/model.onnx_data: no weight is copied. Checked before the manifest lists them: with
all-zero residuals each equals its plain graph (OFF_LIMIT), with random ones it differs from it (every input
wired), and when exporting, it equals diffusers' U-Net called with the same residuals.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ExportFailed, InvalidRequest, OutputNotWritable
from ..runtime import names
from ..runtime.engines import OrtEngine
from ..runtime.fsutil import sha256_file
from ..runtime.manifest import Manifest, load_manifest, residual_shapes
from . import verify
from .bundle_edit import bundle_lock, check_feeds, write_manifest
from .passes import residuals as residual_pass
from .trace import graph_spec

OFF_LIMIT = 1e-6  # zero residuals against the plain graph: x + 0 is x, so in practice 0
GRAPHS = {names.MODEL_FILE: names.CONTROLNET_MODEL_FILE, names.CPU_MODEL_FILE: names.CONTROLNET_CPU_MODEL_FILE}


def residual_layout(unet_config: dict) -> list[dict]:
    """{"name", "channels", "level"} (the manifest's `residuals` entries) of each residual diffusers' U-Net takes,
    down 0..N-1 then mid, from its config: conv_in's output, each down block's layers, and its downsampler (all but
    the last block). Level L: the latent size halved L times (each downsampler is a stride-2 convolution:
    ceil(n / 2))."""
    channels = [int(c) for c in unet_config["block_out_channels"]]
    layers = unet_config["layers_per_block"]
    layers = [int(layers)] * len(channels) if isinstance(layers, int) else [int(n) for n in layers]
    out, level = [(channels[0], 0)], 0
    for i, c in enumerate(channels):
        out += [(c, level)] * layers[i]
        if i < len(channels) - 1:
            level += 1
            out.append((c, level))
    inputs = [names.down_residual(i) for i in range(len(out))] + [names.MID_RESIDUAL]
    return [{"name": n, "channels": c, "level": lv} for n, (c, lv) in zip(inputs, out + [(channels[-1], level)])]


def residual_feeds(layout, batch: int, h: int, w: int, rng: np.random.Generator | None = None) -> dict:
    """Residual inputs for latents of h x w: zeros, or standard normal draws from rng."""
    shapes = residual_shapes(layout, batch, h, w)
    return {name: np.zeros(shape, np.float32) if rng is None else rng.standard_normal(shape, dtype=np.float32)
            for name, shape in shapes.items()}


def write(unet_dir: Path, layout) -> list[str]:
    """The variant of each U-Net graph in unet_dir; returns the files written (relative to unet_dir)."""
    import onnx

    written = []
    for plain, variant in GRAPHS.items():
        if not (unet_dir / plain).is_file():
            continue
        model = onnx.load(str(unet_dir / plain), load_external_data=False)
        try:
            residual_pass.add_residual_inputs(model, layout)
        except ValueError as e:
            raise InvalidRequest(f"the U-Net graph {plain} can't take ControlNet residuals ({e}); re-export the "
                                 "bundle with this sdrt") from None
        onnx.save_model(model, str(unet_dir / variant))
        written.append(variant)
    return written


def check(unet_dir: Path, layout, feeds: dict[str, np.ndarray], traced=None) -> dict[str, float]:
    """The module docstring's checks on every variant written; raises ExportFailed. traced: the U-Net as the
    exporter traced it (export.families.Traced), for the check against torch. Returns {check: error}."""
    h, w = feeds[names.SAMPLE].shape[2:]
    zeros = residual_feeds(layout, 1, h, w)
    drawn = residual_feeds(layout, 1, h, w, np.random.default_rng(4321))
    expected = None if traced is None else _torch_output(traced, feeds, drawn, layout)
    errors = {}
    for plain, variant in GRAPHS.items():
        if not (unet_dir / variant).is_file():
            continue
        base = OrtEngine(unet_dir / plain, names.UNET)(**feeds)[names.OUT_SAMPLE]
        engine = OrtEngine(unet_dir / variant, names.UNET_CONTROLNET)  # one session at a time: each holds the weights
        off = verify.relative_error(engine(**feeds, **zeros)[names.OUT_SAMPLE], base)
        errors[f"{variant} with zero residuals vs {plain}"] = _within(off, OFF_LIMIT, variant, "with zero residuals "
                                                                      "differs from the plain U-Net")
        on = engine(**feeds, **drawn)[names.OUT_SAMPLE]
        if not verify.relative_error(on, base) > 1e-3:
            raise ExportFailed(f"unet/{variant} ignores its residual inputs; nothing was added")
        if expected is not None:
            errors[f"{variant} vs torch"] = _within(verify.relative_error(on, expected), verify.RELATIVE_ERROR_LIMIT,
                                                    variant, "differs from diffusers' U-Net with residuals")
        del engine
    return errors


def _torch_output(traced, feeds, drawn, layout) -> np.ndarray:
    """The family's traced U-Net on feeds, its diffusers U-Net (`.m`) called with the residuals added to its
    arguments: the reference whatever the family's wrapper does around it."""
    import torch

    residuals = {k: torch.from_numpy(v) for k, v in drawn.items()}

    def with_residuals(module, args, kwargs):
        return args, {**kwargs, "down_block_additional_residuals": tuple(residuals[r["name"]] for r in layout[:-1]),
                      "mid_block_additional_residual": residuals[layout[-1]["name"]]}

    handle = traced.module.m.register_forward_pre_hook(with_residuals, with_kwargs=True)
    try:
        with torch.no_grad():
            out = traced.module(*(torch.from_numpy(feeds[n]) for n in traced.input_names))
    finally:
        handle.remove()
    return (out[0] if isinstance(out, tuple) else out).numpy()


def _within(error: float, limit: float, variant: str, what: str) -> float:
    if not error <= limit:
        raise ExportFailed(f"unet/{variant} {what} by relative error {error:.3g} (limit {limit:g}); it was not added")
    return error


def remove(unet_dir: Path) -> None:
    for variant in GRAPHS.values():
        (unet_dir / variant).unlink(missing_ok=True)


def add_to(bundle: Path, layout, feeds: dict[str, np.ndarray], traced=None, log=print) -> dict:
    """Write and check the variant in `bundle` (being exported, or existing); on failure delete what was written.
    Returns the manifest entries: {"graphs", "cpu_graphs", "residuals", "errors"}."""
    unet_dir = bundle / names.UNET
    try:
        written = write(unet_dir, layout)
        errors = check(unet_dir, layout, feeds, traced)
    except BaseException:
        remove(unet_dir)
        raise
    log(f"{names.UNET_CONTROLNET}: {len(layout) - 1} skip connections and the mid block take ControlNet residuals "
        f"in {', '.join(written)} (checked: zero residuals = the plain U-Net"
        f"{', residuals vs torch' if traced is not None else ''}; worst relative error {max(errors.values()):.2e})")
    plain, cpu = (f"{names.UNET}/{GRAPHS[g]}" for g in (names.MODEL_FILE, names.CPU_MODEL_FILE))
    return {"graphs": {names.UNET_CONTROLNET: graph_spec(bundle / plain, plain)},
            "cpu_graphs": {names.UNET_CONTROLNET: cpu} if (bundle / cpu).is_file() else {},
            "residuals": [dict(r) for r in layout],
            "errors": {f"{names.UNET_CONTROLNET}: {k}": v for k, v in errors.items()}}


def prepare(bundle: str | Path, log=print) -> bool:
    """`sdrt controlnet prepare BUNDLE`: add the variant to a bundle exported without it (False: it had it)."""
    bundle = Path(bundle).expanduser()
    manifest = load_manifest(bundle, verify_hashes=False)
    if not manifest.hashed:
        raise InvalidRequest(f"{str(bundle)!r} has no {names.MANIFEST_FILE} (an optimum folder): export the model "
                             "with `sdrt export SRC --out BUNDLE`, which writes the ControlNet U-Net too")
    try:
        with bundle_lock(bundle):
            manifest = load_manifest(bundle)  # under the lock, hashes checked
            if names.UNET_CONTROLNET in manifest.graphs:
                log(f"{bundle} already takes ControlNets")
                return False
            config = json.loads((bundle / names.UNET / "config.json").read_text(encoding="utf-8"))
            feeds = check_feeds(manifest, "ControlNets can be added")
            entries = add_to(bundle, residual_layout(config), feeds, log=log)
            try:
                _update(manifest, entries, bundle)
                write_manifest(bundle, manifest, entries["errors"])
            except BaseException:
                remove(bundle / names.UNET)
                raise
    except OSError as e:
        raise OutputNotWritable(f"preparing {str(bundle)!r} for ControlNet failed ({e.strerror or e}); the bundle "
                                "was left as it was. Check the free space and permissions of its folder") from None
    return True


def _update(manifest: Manifest, entries: dict, bundle: Path) -> None:
    manifest.graphs.update(entries["graphs"])
    manifest.cpu_graphs.update(entries["cpu_graphs"])
    manifest.residuals = entries["residuals"]
    for rel in [*(g.path for g in entries["graphs"].values()), *entries["cpu_graphs"].values()]:
        manifest.files[rel] = sha256_file(bundle / rel)

