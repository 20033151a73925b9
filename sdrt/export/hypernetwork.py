"""Hypernetworks into a bundle: a U-Net variant per file or stack (passes/hypernet.py bakes it), checked
against torch (hypernet_torch.py).

`export_bundle(..., hypernetworks=[FILE])` (sdrt export --hypernetwork FILE) bakes while exporting;
hypernet_bundle.py adds to (and removes from) a bundle that exists, from its graphs alone. Per variant NAME
(a file's stem, or the stack's stems joined by "+"), beside the U-Net's graphs (names.py):

    unet/hypernet/NAME.onnx        the plain U-Net graph, rewired (TensorRT and the CUDA provider build from it)
    unet/hypernet/NAME.cpu.onnx    the CPU graph, rewired alike (when the bundle has one)
    unet/hypernet/NAME.onnx_data   the modules' weights; the U-Net's own stay in unet/model.onnx_data

The checks, before anything is listed in the manifest: every rewired context against the torch modules on the
graph's own tensors (the modules, as torch computes them); the variant at strength 0 against the plain graph
(the rest of the U-Net untouched); and, when exporting, the whole variant against diffusers' U-Net with an
attention processor that applies A1111's rule (the wiring: which attention gets which module). Members of a
stack are checked at different strengths, so swapped strength inputs would show.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from ..errors import ExportFailed, InvalidRequest
from ..runtime import names
from ..runtime.engines import OrtEngine
from . import verify
from .hypernet_file import Hypernetwork, check_widths, read_hypernetwork
from .hypernet_torch import applied, chain
from .passes import hypernet as bake_pass
from .trace import graph_spec

OFF_LIMIT = 1e-5  # strength 0 against the plain graph: the same operators on the same numbers
CHECK_STRENGTHS = (1.0, 0.6, 0.8, 0.5, 0.9, 0.7)  # member i of a stack is checked at CHECK_STRENGTHS[i % 6]


def model_widths(lora_map: dict) -> tuple[set[int], int]:
    """(the self-attentions' widths, the text width the cross-attentions read), from the U-Net's lora_map."""
    def widths(kind: str) -> set[int]:
        return {int(e["shape"][1]) for path, e in lora_map.items() if path.endswith(f".{kind}.to_k")}

    text = widths("attn2")
    if len(text) != 1:
        raise InvalidRequest(f"the U-Net's cross-attentions read contexts of widths {sorted(text)}, not one "
                             "text width: hypernetworks need an SD 1.x/2.x-style U-Net")
    return widths("attn1"), text.pop()


def variant_name(members: list[Hypernetwork]) -> str:
    return "+".join(hn.name for hn in members)


def _variant_files(name: str) -> dict[str, str]:
    """The U-Net graph file -> its variant's path relative to unet/."""
    return {names.MODEL_FILE: f"{names.HYPERNET_FOLDER}/{name}.onnx",
            names.CPU_MODEL_FILE: f"{names.HYPERNET_FOLDER}/{name}.cpu.onnx"}


def variant_data(name: str) -> str:
    """The variant's own weights (the modules'), relative to unet/."""
    return f"{names.HYPERNET_FOLDER}/{name}.onnx_data"


def write_variant(unet_dir: Path, members: list[Hypernetwork]) -> tuple[dict[str, list], list[list[int]]]:
    """Bake `members` (in order) into each U-Net graph in unet_dir. Returns ({variant rel path: rewired
    [(context, new, kv, width)]}, the widths applied per member)."""
    import onnx

    lora_map = json.loads((unet_dir / names.LORA_MAP_FILE).read_text(encoding="utf-8"))
    blocks, text = model_widths(lora_map)
    widths = [check_widths(hn, blocks, text) for hn in members]
    name = variant_name(members)
    (unet_dir / names.HYPERNET_FOLDER).mkdir(exist_ok=True)
    models, weights = {}, {}
    for graph, variant in _variant_files(name).items():
        if not (unet_dir / graph).is_file():
            continue
        model = onnx.load(str(unet_dir / graph), load_external_data=False)
        try:
            new, rewired = bake_pass.bake(model, lora_map, list(zip(members, widths)))
        except ValueError as e:
            raise InvalidRequest(f"the U-Net graph {graph} can't take hypernetwork {name!r} ({e}); re-export "
                                 "the bundle with this sdrt") from None
        weights.update(new)  # both graphs name each weight alike: stored once
        models[variant] = (model, rewired)
    data = variant_data(name)
    bake_pass.add_weights([m for m, _ in models.values()], weights, unet_dir / data, data)
    for variant, (model, _) in models.items():
        onnx.save_model(model, str(unet_dir / variant))
    return {variant: rewired for variant, (_, rewired) in models.items()}, widths


def _check_stack(members: list[Hypernetwork]) -> list[tuple[Hypernetwork, float]]:
    """The members at their check strengths, in order (as float32: what the graph's inputs hold)."""
    return [(hn, float(np.float32(CHECK_STRENGTHS[i % len(CHECK_STRENGTHS)]))) for i, hn in enumerate(members)]


def _strengths(members: list[Hypernetwork]) -> dict[str, np.ndarray]:
    """The variant's strength inputs at the check strengths."""
    return {names.strength_input(i): np.float32(s) for i, (_, s) in enumerate(_check_stack(members))}


def check_variant(unet_dir: Path, members: list[Hypernetwork], rewired: dict[str, list],
                  feeds: dict[str, np.ndarray], expected: np.ndarray | None = None) -> dict[str, float]:
    """The checks of the module docstring on each variant graph; raises ExportFailed. expected: torch's U-Net
    output with the members at their check strengths, when a torch U-Net is at hand. Returns {check: error}."""
    name, errors = variant_name(members), {}
    strengths = _strengths(members)
    for graph, variant in _variant_files(name).items():
        if variant not in rewired:
            continue
        # One ONNX Runtime session at a time: each holds the U-Net's weights (10 GB for SDXL's in fp32).
        plain = OrtEngine(unet_dir / graph, names.UNET)(**feeds)[names.OUT_SAMPLE]
        errors[f"{variant} modules vs torch"] = _check_modules(unet_dir, variant, members, rewired[variant], feeds)
        engine = OrtEngine(unet_dir / variant, names.hypernet_component(name), data_dir=unet_dir)
        off = engine(**feeds, **{k: np.float32(0) for k in strengths})[names.OUT_SAMPLE]
        errors[f"{variant} at strength 0 vs {graph}"] = _within(verify.relative_error(off, plain), OFF_LIMIT,
                                                                 name, variant, "at strength 0 differs from the plain U-Net")
        if expected is not None:
            on = engine(**feeds, **strengths)[names.OUT_SAMPLE]
            errors[f"{variant} vs torch"] = _within(verify.relative_error(on, expected), verify.RELATIVE_ERROR_LIMIT,
                                                    name, variant, "differs from torch's U-Net with the hypernetwork")
        del engine
    return errors


def _within(error: float, limit: float, name: str, variant: str, what: str) -> float:
    if not error <= limit:
        raise ExportFailed(f"hypernetwork {name!r}: unet/{variant} {what} by relative error {error:.3g} "
                           f"(limit {limit:g}); nothing was added")
    return error


def _check_modules(unet_dir: Path, variant: str, members: list[Hypernetwork], rewired: list, feeds: dict) -> float:
    """Each rewired context c and its c_K or c_V, read out of the graph, against the torch chain on that c."""
    import os

    import onnx
    import torch
    from onnx import TensorProto, helper

    model = onnx.load(str(unet_dir / variant), load_external_data=False)
    wanted = [t for context, new, *_ in rewired for t in (context, new) if t not in feeds]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in wanted)
    probe = unet_dir / names.HYPERNET_FOLDER / f".probe-{os.getpid()}-{variant_name(members)}.onnx"
    strengths = _strengths(members)
    try:
        onnx.save_model(model, str(probe))
        out = OrtEngine(probe, "hypernetwork probe", data_dir=unet_dir)(**feeds, **strengths)
    finally:
        probe.unlink(missing_ok=True)
    values = {**feeds, **out}
    stack = _check_stack(members)
    worst = 0.0
    for context, new, kv, width in rewired:
        with torch.no_grad():
            ref = chain(stack, width, kv)(torch.from_numpy(values[context])).numpy()
        worst = max(worst, verify.relative_error(values[new], ref))
    return _within(worst, verify.RELATIVE_ERROR_LIMIT, variant_name(members), variant, "computes a module unlike torch")


def bake_into(bundle: Path, members: list[Hypernetwork], feeds: dict[str, np.ndarray], torch_unet=None,
              log=print) -> dict:
    """Write and check the variant of `members` in `bundle` (a bundle being exported, or one that exists); on
    failure delete what was written. Returns the manifest entries: {"graphs", "cpu_graphs", "hypernetworks",
    "errors"}."""
    name = variant_name(members)
    unet_dir, comp = bundle / names.UNET, names.hypernet_component(name)
    try:
        rewired, widths = write_variant(unet_dir, members)
        expected = None
        if torch_unet is not None:
            import torch

            with applied(torch_unet, _check_stack(members)), torch.no_grad():
                t = {k: torch.from_numpy(v) for k, v in feeds.items()}
                expected = torch_unet(t[names.SAMPLE], t[names.TIMESTEP],
                                      encoder_hidden_states=t[names.ENCODER_HIDDEN_STATES]).sample.numpy()
        errors = check_variant(unet_dir, members, rewired, feeds, expected)
    except BaseException:
        remove_variant(unet_dir, name)
        raise
    plain, cpu = (f"{names.UNET}/{rel}" for rel in _variant_files(name).values())
    log(f"hypernetwork {name}: {len(rewired[next(iter(rewired))])} attention inputs rewired (widths "
        f"{'; '.join(', '.join(map(str, w)) for w in widths)}) in {', '.join(rewired)}; {len(errors)} checks "
        f"passed ({'modules and whole U-Net' if expected is not None else 'modules'} vs torch, strength 0 vs "
        f"the plain U-Net; worst relative error {max(errors.values()):.2e})")
    files = [{"name": hn.name, "file": hn.path.name, "sha256": hn.sha256, "widths": w} for hn, w in zip(members, widths)]
    entry = {"component": comp, **files[0]} if len(members) == 1 else {"component": comp, "stack": files}
    entry.pop("name", None)
    return {"graphs": {comp: graph_spec(bundle / plain, plain)},
            "cpu_graphs": {comp: cpu} if (bundle / cpu).is_file() else {},
            "hypernetworks": {name: entry},
            "errors": {f"{comp}: {k}": v for k, v in errors.items()}}


def remove_variant(unet_dir: Path, name: str) -> None:
    """Delete what write_variant wrote for `name` (and the hypernet folder when that leaves it empty)."""
    for rel in [*_variant_files(name).values(), variant_data(name)]:
        (unet_dir / rel).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (unet_dir / names.HYPERNET_FOLDER).rmdir()  # only when empty


def read_all(files, allow_pickle: bool, stack: bool = False) -> list[Hypernetwork]:
    """The files of `--hypernetwork FILE ...` (or of one stack), read and checked before any work starts."""
    out = []
    for f in files or []:
        hn = read_hypernetwork(f, allow_pickle)
        if any(h.name == hn.name for h in out):
            what = "a stack applies each file once" if stack else "each needs its own name (its <hypernet:NAME> tag)"
            raise InvalidRequest(f"two hypernetwork files are named {hn.name!r}: {what}; rename one")
        out.append(hn)
    return out
