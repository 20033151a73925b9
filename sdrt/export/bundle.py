"""Write a bundle: optimum's ONNX folder layout plus the manifest `sdrt.json`, which is written last.

The stages, for every model family (export/families): load the source; per component, trace it to ONNX
(trace.py), check the graph against torch (verify.py), and write its CPU graph through `CPU_GRAPH_PASSES`
(export/passes) and, with --int8, its int8 graph; then the family's other files and the manifest. Building
TensorRT engines from a bundle is the next stage, `sdrt build` (build.py).

Everything is built in a hidden temp folder beside BUNDLE and renamed into place at the end, so a failed
or interrupted export leaves no half bundle at BUNDLE.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from pathlib import Path

from .. import __version__
from ..errors import ExportFailed, InvalidRequest, OutputNotWritable
from ..runtime import names, request
from ..runtime.engines import native_ops
from ..runtime.fsutil import atomic_write_bytes, fsync_dir, make_temp_dir, relax_permissions, sha256_file
from ..runtime.manifest import Manifest
from ..runtime.tokenizer import ClipTokenizer, load_tokenizer_files
from . import controlnet_unet, trace, verify
from . import hypernetwork as hypernet_mod
from .trace import graph_spec
from .families import ExportFamily, family_for
from .passes import PassContext, Unsupported, cpu_graph, native_graph, winograd
from .passes import int8 as int8_mod
from .source import Source

# The CPU graph (model.cpu.onnx) of a component, for ONNX Runtime on the CPU: its plain graph through these
# passes, in this order (each a no-op where it does not apply; export/passes).
CPU_GRAPH_PASSES = (
    cpu_graph.fused_attention,  # U-Net: retraced with each attention one operator (replaces the model)
    winograd.convolutions,  # large 3x3 convolutions by Winograd; before sharing, on the trace's own names
    native_graph.group_norms,  # small U-Nets: GroupNorm (+ SiLU) as sdrt's operators
    cpu_graph.shared_weights,  # a retraced graph's weights pointed at the plain graph's model.onnx_data
)

# Prompts on which the runtime tokenizer must give transformers' ids before a bundle is written.
TOKENIZER_CORPUS = [
    "", "   ", "a photo of an astronaut riding a horse on mars",
    "A Red CIRCLE on a blue background!!", "naïve café, Ünïcödé straße — ½ ∞ 東京 🐱🚀",
    "don't it's we'll I'm you've they're she'd", "x" * 300,
    ", ".join(["masterpiece", "best quality", "ultra detailed"] * 12), "line\nbreak\ttab",
]


def check_tokenizer(src_tokenizer: Path) -> tuple[ClipTokenizer, int]:
    """Our tokenizer against transformers' on the corpus; returns it and the pad id."""
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(str(src_tokenizer))
    max_length = min(reference.model_max_length, 77)
    ours = ClipTokenizer(load_tokenizer_files(src_tokenizer), max_length, reference.pad_token_id)
    for prompt in TOKENIZER_CORPUS:
        want = reference(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = ours([prompt])[0].tolist()
        if got != want:
            raise ExportFailed(f"the runtime tokenizer disagrees with transformers' CLIPTokenizer on {prompt!r}: "
                               f"{got[:12]}... vs {want[:12]}...; the tokenizer files are not CLIP's")
    return ours, reference.pad_token_id


def _default_size(source: Source, height: int | None, width: int | None) -> tuple[int, int]:
    """The bundle's default image size: as given, else the model's own (U-Net sample_size x VAE scale)."""
    scale = 2 ** (len(source.vae.config.block_out_channels) - 1)
    native = int(source.unet.config.sample_size) * scale
    return (request.check_size(native if height is None else height, "--height", scale),
            request.check_size(native if width is None else width, "--width", scale))


def _prepare_target(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputNotWritable(f"{str(out)!r} already exists; choose another --out or pass --force to replace it")
    if not out.parent.is_dir():
        raise OutputNotWritable(f"the folder {str(out.parent)!r} does not exist; create it first")


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"sdrt": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


def export_bundle(src: Path, out: Path, height: int | None = None, width: int | None = None,
                  allow_pickle: bool = False, force: bool = False,
                  external_threshold: int = trace.EXTERNAL_DATA_THRESHOLD, log=print,
                  family: str | None = None, cpu_graph_policy: str = "auto", int8: bool = False,
                  winograd_rule: str = "auto", hypernetworks=()) -> Manifest:
    """src: a diffusers model folder, or a single-file checkpoint (family: sd1, sd2, sd2-v; default detected).
    cpu_graph_policy: "auto", "always" or "never": whether to add the graphs that the ONNX Runtime CPU backend
    opens instead of the plain ones (CPU_GRAPH_PASSES): the U-Net's (fused attention, Winograd convolutions;
    "auto" writes it always) and the VAE decoder's (Winograd convolutions; "auto" from 256x256 images up).
    winograd_rule: which 3x3 convolutions those graphs compute by Winograd (a key of export/passes/winograd.py's
    RULES). int8: also write the opt-in int8 U-Net (export/passes/int8.py). hypernetworks: A1111 hypernetwork
    files (.pt, read with allow_pickle) to bake into U-Net variants (export/hypernetwork.py)."""
    if cpu_graph_policy not in cpu_graph.POLICIES:
        raise InvalidRequest(f"cpu graph policy {cpu_graph_policy!r} is not one of {', '.join(cpu_graph.POLICIES)}")
    out = Path(out).expanduser().resolve()
    _prepare_target(out, force)
    hns = hypernet_mod.read_all(hypernetworks, allow_pickle)  # refused before any export work
    model_family = family_for(Path(src))
    source = model_family.load(Path(src), allow_pickle, family)
    try:
        return _write_bundle(model_family, source, out, height, width, force, external_threshold, log,
                             (cpu_graph_policy, winograd_rule), int8, hns)
    finally:
        source.close()  # a single-file checkpoint's temporary config folder


def _write_bundle(family: ExportFamily, source: Source, out: Path, height: int | None, width: int | None,
                  force: bool, external_threshold: int, log, cpu: tuple[str, str] = ("auto", "auto"),
                  int8: bool = False, hypernetworks=()) -> Manifest:
    height, width = _default_size(source, height, width)
    tokenizer, pad_id = check_tokenizer(source.path / "tokenizer")
    tmp = make_temp_dir(out)
    try:
        graphs, errors, cpu_graphs, int8_graphs, hypernets, unet_feeds, unet = {}, {}, {}, {}, {}, None, None
        ids = tokenizer(["a photo of a cat"])  # (1, 77): the text encoder's check input
        scale = 2 ** (len(source.vae.config.block_out_channels) - 1)  # image pixels per latent pixel
        for comp, traced in family.components(source).items():
            started = time.perf_counter()
            want_cpu = cpu_graph.wanted(cpu[0], comp, height, width, scale)
            path = trace.export_onnx(traced.module, traced.inputs, traced.input_names, traced.output_names,
                                     traced.dynamic_axes, tmp / comp, external_threshold,
                                     lora_targets=comp in names.LORA_COMPONENTS,
                                     external=want_cpu and comp == names.VAE_DECODER)  # shared with its CPU graph
            feeds = family.check_inputs(source, comp, height, width, ids)
            unet_feeds, unet = (feeds, traced) if comp == names.UNET else (unet_feeds, unet)
            with winograd.recording_conv_sizes(traced.module) as conv_sizes:  # for the CPU graphs' Winograd rule
                expected = family.expected_outputs(source, comp, traced, feeds, ids)
            errors[comp] = verify.verify(comp, expected, path, feeds)
            graphs[comp] = graph_spec(path, f"{comp}/{names.MODEL_FILE}")
            log(f"{comp}: exported and checked in {time.perf_counter() - started:.1f}s "
                f"(relative error vs torch {errors[comp]:.2e})")
            if want_cpu:
                fast = _write_cpu_graph(PassContext(comp, path, traced, conv_sizes, cpu[1]), log)
                if fast is not None:
                    errors.update(_verify_cpu_graph(comp, expected, fast, feeds))
                    cpu_graphs[comp] = f"{comp}/{names.CPU_MODEL_FILE}"
            if comp == names.UNET and int8:  # from the fused-attention graph when there is one
                base = tmp / cpu_graphs.get(comp, f"{comp}/{names.MODEL_FILE}")
                quantized = int8_mod.write_int8_graph(base, log)
                errors[f"{comp} ({names.INT8_MODEL_FILE})"] = verify.verify(comp, expected, quantized, feeds,
                                                                          limit=int8_mod.INT8_ERROR_LIMIT)
                int8_graphs[comp] = f"{comp}/{names.INT8_MODEL_FILE}"
        family.write_files(source, tmp, tokenizer)
        residuals = []
        if (layout := family.residual_layout(source)) is not None:  # the U-Net that takes ControlNet residuals
            entries = controlnet_unet.add_to(tmp, layout, unet_feeds, unet, log)
            graphs.update(entries["graphs"])
            cpu_graphs.update(entries["cpu_graphs"])
            errors.update(entries["errors"])
            residuals = entries["residuals"]
        for hn in hypernetworks:  # U-Net variants, from its finished graphs and lora_map.json
            entries = hypernet_mod.bake_into(tmp, [hn], unet_feeds, source.unet, log)
            graphs.update(entries["graphs"])
            cpu_graphs.update(entries["cpu_graphs"])
            hypernets.update(entries["hypernetworks"])
            errors.update(entries["errors"])
        relax_permissions(tmp)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = Manifest(
            graphs=graphs, default_height=height, default_width=width, files=files, source_hash=source.hash,
            cpu_graphs=cpu_graphs, int8_graphs=int8_graphs, hypernetworks=hypernets, residuals=residuals,
            versions=_versions(),
            **family.manifest_fields(source, tokenizer, pad_id), family=family.name,
            family_settings=family.settings(source))
        data = manifest.to_json()
        data["verification"] = {"metric": "relative L2 error vs torch", "limit": verify.RELATIVE_ERROR_LIMIT,
                                "errors": errors}
        atomic_write_bytes(tmp / names.MANIFEST_FILE, (json.dumps(data, indent=2) + "\n").encode())
        _swap_into_place(tmp, out, force)
    except OSError as e:  # disk full, permissions, a vanished folder: clean up, then say what failed
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportFailed(f"writing the bundle failed ({e.strerror or e}); nothing was written at {str(out)!r}. "
                           "Check the free space and permissions of its folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_cpu_graph(ctx: PassContext, log) -> Path | None:
    """model.cpu.onnx beside the plain graph: CPU_GRAPH_PASSES over it. None when no pass rewrote anything (a VAE
    decoder without a convolution Winograd takes) or one could not rewrite the model exactly."""
    import onnx

    model = onnx.load(str(ctx.plain_graph), load_external_data=False)  # weights stay in its model.onnx_data
    try:
        for graph_pass in CPU_GRAPH_PASSES:
            model = graph_pass(model, ctx)
    except Unsupported as e:
        log(f"{ctx.component}: no fused-attention graph ({e}); the CPU backend uses the plain graph")
        return None
    if not ctx.retraced and not any(ctx.counts.values()):
        return None
    target = ctx.plain_graph.parent / names.CPU_MODEL_FILE
    onnx.save_model(model, str(target))
    n = ctx.counts
    if ctx.retraced:
        log(f"{ctx.component}: {n.get('attention', 0)} attention layers fused ({n.get('native attention', 0)} as "
            f"sdrt's kernel), {n.get('group norms', 0)} group norms as sdrt's kernel and {n.get('winograd', 0)} "
            f"convolutions in Winograd form for ONNX Runtime on the CPU ({names.CPU_MODEL_FILE})")
    else:
        log(f"{ctx.component}: {n.get('winograd', 0)} convolutions in Winograd form for ONNX Runtime on the CPU "
            f"({names.CPU_MODEL_FILE})")
    return target


def _verify_cpu_graph(comp: str, expected: list, path: Path, feeds: dict) -> dict[str, float]:
    """The CPU graph's error on ONNX Runtime's operators and, where it uses sdrt's (export/passes/native_graph.py) and
    this machine has them (runtime/engines/native_ops.py), on those too: a bundle runs either way."""
    import onnx

    key = f"{comp} ({names.CPU_MODEL_FILE})"
    runs = {key: None}
    if any(n.domain == native_graph.DOMAIN for n in onnx.load(str(path), load_external_data=False).graph.node):
        if (library := native_ops.library()) is not None:
            runs[f"{key}, sdrt operators"] = library
    try:
        return {label: verify.verify(comp, expected, path, feeds, native_ops=lib) for label, lib in runs.items()}
    except ExportFailed as e:
        raise ExportFailed(f"{e} (the {comp} CPU graph; export with --cpu-graph never to leave it out)") from None


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished bundle onto `out`. Another export may have written `out` meanwhile: without
    --force that one is kept and this one dropped, never half-merged."""
    old = None
    if out.exists() and force:
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
    try:
        tmp.rename(out)  # fails on a non-empty folder, so a bundle that appeared meanwhile is not clobbered
    except OSError:
        if old is not None:
            old.rename(out)
        raise OutputNotWritable(f"{str(out)!r} appeared while exporting (another export?); it was left as it is. "
                                "Choose another --out or pass --force to replace it") from None
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
