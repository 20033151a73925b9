"""Write a ControlNet bundle (`sdrt export CONTROLNET_SRC --out CN_BUNDLE`): the ControlNet traced to ONNX and
checked against torch, its CPU graph (fused attention, Winograd convolutions: export/passes), the config, and
the manifest sdrt.json (format "sdrt-controlnet", runtime/controlnet.py), written last.

    controlnet/model.onnx (+ model.onnx_data)   sample, timestep, encoder_hidden_states, controlnet_cond -> residuals
    controlnet/model.cpu.onnx                   the same for ONNX Runtime's CPU backend, on the same weights

The residuals come out unscaled (conditioning_scale 1): the runtime scales them (weight, guess mode, start/end).
As for model bundles, everything is written into a hidden folder beside CN_BUNDLE and renamed into place.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import OutputNotWritable
from ..runtime import names, request
from ..runtime.controlnet import ControlNetManifest
from ..runtime.fsutil import atomic_write_bytes, make_temp_dir, relax_permissions, sha256_file
from . import trace, verify
from .bundle import _prepare_target, _swap_into_place, _verify_cpu_graph, _versions, _write_cpu_graph
from .controlnet_source import load_controlnet
from .controlnet_unet import residual_layout
from .families.base import Traced
from .passes import PassContext, winograd


def _wrapper(model):
    import torch

    class ControlNet(torch.nn.Module):
        """diffusers' ControlNetModel at conditioning scale 1, its residuals as separate outputs."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
            down, mid = self.m(sample, timestep, encoder_hidden_states, controlnet_cond, return_dict=False)
            return (*down, mid)

    return ControlNet(model)


def _traced(model, layout, scale: int) -> Traced:
    import torch

    config = model.config
    ups = 2 ** (len(config.block_out_channels) - 1)
    h, w = 2 * ups + 1, 3 * ups + 1  # odd latent sizes, as the U-Net's trace (export/families/sd.py)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, config.in_channels, h, w, generator=g), torch.tensor([500.0, 500.0]),
              torch.randn(2, 77, config.cross_attention_dim, generator=g),
              torch.rand(2, config.conditioning_channels, h * scale, w * scale, generator=g))
    in_names = [names.SAMPLE, names.TIMESTEP, names.ENCODER_HIDDEN_STATES, names.CONTROLNET_COND]
    out_names = [r["name"] for r in layout]
    axes = {names.SAMPLE: {0: "batch", 2: "height", 3: "width"}, names.TIMESTEP: {0: "batch"},
            names.ENCODER_HIDDEN_STATES: {0: "batch", 1: "tokens"},
            names.CONTROLNET_COND: {0: "batch", 2: "image_height", 3: "image_width"},
            **{r["name"]: {0: "batch", 2: f"residual_height_{r['level']}", 3: f"residual_width_{r['level']}"}
               for r in layout}}
    return Traced(_wrapper(model), inputs, in_names, out_names, axes)


def _check_feeds(model, height: int, width: int, scale: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    c = model.config
    return {names.SAMPLE: rng.standard_normal((1, c.in_channels, height // scale, width // scale), dtype=np.float32),
            names.TIMESTEP: np.array([321.0], dtype=np.float32),
            names.ENCODER_HIDDEN_STATES: rng.standard_normal((1, 154, c.cross_attention_dim), dtype=np.float32),
            names.CONTROLNET_COND: rng.uniform(0, 1, (1, c.conditioning_channels, height, width)).astype(np.float32)}


def export_controlnet(src: Path, out: Path, height: int | None = None, width: int | None = None,
                      allow_pickle: bool = False, force: bool = False, family: str | None = None, log=print,
                      cpu_graph_policy: str = "auto", winograd_rule: str = "auto") -> ControlNetManifest:
    """src: a diffusers ControlNetModel folder or a single-file ControlNet (family: sd1 or sd2, default read from
    the weights). height/width: the size the graphs are checked at (default 512). cpu_graph_policy "never" leaves
    the CPU graph out."""
    out = Path(out).expanduser().resolve()
    _prepare_target(out, force)
    source = load_controlnet(Path(src), allow_pickle, family)
    model, config = source.model, source.model.config
    scale = 2 ** (len(config.conditioning_embedding_out_channels) - 1)  # control image pixels per latent pixel
    height = request.check_size(512 if height is None else height, "--height", scale)
    width = request.check_size(512 if width is None else width, "--width", scale)
    layout = residual_layout(dict(config))
    tmp = make_temp_dir(out)
    try:
        started = time.perf_counter()
        traced = _traced(model, layout, scale)
        path = trace.export_onnx(traced.module, traced.inputs, traced.input_names, traced.output_names,
                                 traced.dynamic_axes, tmp / names.CONTROLNET, external=True)
        feeds = _check_feeds(model, height, width, scale)
        import torch

        with winograd.recording_conv_sizes(traced.module) as conv_sizes, torch.no_grad():
            expected = [t.numpy() for t in traced.module(*(torch.from_numpy(v) for v in feeds.values()))]
        errors = {names.CONTROLNET: verify.verify(names.CONTROLNET, expected, path, feeds)}
        log(f"controlnet: exported and checked in {time.perf_counter() - started:.1f}s (relative error vs torch "
            f"{errors[names.CONTROLNET]:.2e}; {len(layout) - 1} down residuals and the mid one)")
        cpu_graphs = {}
        if cpu_graph_policy != "never":
            fast = _write_cpu_graph(PassContext(names.CONTROLNET, path, traced, conv_sizes, winograd_rule), log)
            if fast is not None:
                errors.update(_verify_cpu_graph(names.CONTROLNET, expected, fast, feeds))
                cpu_graphs[names.CONTROLNET] = f"{names.CONTROLNET}/{names.CPU_MODEL_FILE}"
        model.save_config(tmp / names.CONTROLNET)  # config.json, as diffusers writes it
        relax_permissions(tmp)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = ControlNetManifest(
            name=source.name, base_family="sd", text_width=int(config.cross_attention_dim),
            in_channels=int(config.in_channels), image_scale=scale,
            residuals=layout,
            graphs={names.CONTROLNET: trace.graph_spec(path, f"{names.CONTROLNET}/{names.MODEL_FILE}")},
            cpu_graphs=cpu_graphs, files=files, source_hash=source.hash,
            global_pool_conditions=bool(config.global_pool_conditions),
            bgr=config.controlnet_conditioning_channel_order == "bgr", versions=_versions())
        data = manifest.to_json()
        data["verification"] = {"metric": "relative L2 error vs torch", "limit": verify.RELATIVE_ERROR_LIMIT,
                                "errors": errors}
        atomic_write_bytes(tmp / names.MANIFEST_FILE, (json.dumps(data, indent=2) + "\n").encode())
        _swap_into_place(tmp, out, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputNotWritable(f"writing the ControlNet bundle failed ({e.strerror or e}); nothing was written at "
                                f"{str(out)!r}. Check the free space and permissions of its folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
