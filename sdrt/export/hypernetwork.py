"""Hypernetworks into a bundle: a U-Net variant per file (passes/hypernet.py bakes it), checked against torch.

`export_bundle(..., hypernetworks=[FILE])` (sdrt export --hypernetwork FILE) bakes while exporting;
`add_hypernetwork(BUNDLE, FILE)` (sdrt hypernetwork add) bakes into a bundle that exists, from its graphs alone.
Per file NAME.pt, beside the U-Net's graphs (names.py):

    unet/hypernet/NAME.onnx        the plain U-Net graph, rewired (TensorRT and the CUDA provider build from it)
    unet/hypernet/NAME.cpu.onnx    the CPU graph, rewired alike (when the bundle has one)
    unet/hypernet/NAME.onnx_data   the modules' weights; the U-Net's own stay in unet/model.onnx_data

The checks, before anything is listed in the manifest: every rewired context against the torch module on the
graph's own tensors (the modules, as torch computes them); the variant at strength 0 against the plain graph
(the rest of the U-Net untouched); and, when exporting, the whole variant at strength 1 against diffusers' U-Net
with an attention processor that applies A1111's rule (the wiring: which attention gets which module).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import ExportFailed, InvalidRequest, OutputNotWritable
from ..runtime import names
from ..runtime.engines import OrtEngine
from ..runtime.fsutil import atomic_write_bytes, sha256_file
from . import verify
from .trace import graph_spec
from .hypernet_file import Hypernetwork, Module, check_widths, read_hypernetwork
from .passes import hypernet as bake_pass

try:
    import fcntl
except ImportError:  # Windows: no flock; two `hypernetwork add` at once are not protected there
    fcntl = None

OFF_LIMIT = 1e-5  # strength 0 against the plain graph: the same operators on the same numbers
CHECK_STRENGTH = 1.0


def model_widths(lora_map: dict) -> tuple[set[int], int]:
    """(the self-attentions' widths, the text width the cross-attentions read), from the U-Net's lora_map."""
    def widths(kind: str) -> set[int]:
        return {int(e["shape"][1]) for path, e in lora_map.items() if path.endswith(f".{kind}.to_k")}

    text = widths("attn2")
    if len(text) != 1:
        raise InvalidRequest(f"the U-Net's cross-attentions read contexts of widths {sorted(text)}, not one "
                             "text width: hypernetworks need an SD 1.x/2.x-style U-Net")
    return widths("attn1"), text.pop()


def _variant_files(name: str) -> dict[str, str]:
    """The U-Net graph file -> its variant's path relative to unet/."""
    return {names.MODEL_FILE: f"{names.HYPERNET_FOLDER}/{name}.onnx",
            names.CPU_MODEL_FILE: f"{names.HYPERNET_FOLDER}/{name}.cpu.onnx"}


def write_variant(unet_dir: Path, hn: Hypernetwork) -> tuple[dict[str, list], list[int]]:
    """Bake `hn` into each U-Net graph in unet_dir. Returns ({variant rel path: rewired (context, new)}, widths)."""
    import onnx

    lora_map = json.loads((unet_dir / names.LORA_MAP_FILE).read_text(encoding="utf-8"))
    blocks, text = model_widths(lora_map)
    widths = check_widths(hn, blocks, text)
    (unet_dir / names.HYPERNET_FOLDER).mkdir(exist_ok=True)
    models, weights = {}, {}
    for graph, variant in _variant_files(hn.name).items():
        if not (unet_dir / graph).is_file():
            continue
        model = onnx.load(str(unet_dir / graph), load_external_data=False)
        try:
            new, rewired = bake_pass.bake(model, lora_map, hn, widths)
        except ValueError as e:
            raise InvalidRequest(f"the U-Net graph {graph} can't take hypernetwork {hn.name!r} ({e}); re-export "
                                 "the bundle with this sdrt") from None
        weights.update(new)  # both graphs name each weight alike: stored once
        models[variant] = (model, rewired)
    data = f"{names.HYPERNET_FOLDER}/{hn.name}.onnx_data"
    bake_pass.add_weights([m for m, _ in models.values()], weights, unet_dir / data, data)
    for variant, (model, _) in models.items():
        onnx.save_model(model, str(unet_dir / variant))
    return {variant: rewired for variant, (_, rewired) in models.items()}, widths


def torch_module(module: Module):
    """x -> x + s * f(x) in torch, f built as A1111 builds it (its activation_dict: torch.nn's activations by
    lower-cased class name, "swish" = Hardswish; LayerNorm eps 1e-5), from the file's weights."""
    import torch
    import torch.nn.functional as F

    classes = {k.lower(): v for k, v in vars(torch.nn.modules.activation).items() if isinstance(v, type)}
    classes["swish"] = torch.nn.Hardswish
    ops = []
    for op, layer in module.steps():
        if op == "linear":
            ops.append(lambda h, w=torch.from_numpy(layer.weight), b=torch.from_numpy(layer.bias): F.linear(h, w, b))
        elif op == "ln":
            ops.append(lambda h, w=torch.from_numpy(layer.weight), b=torch.from_numpy(layer.bias):
                       F.layer_norm(h, (w.shape[0],), w, b, 1e-5))
        else:
            act = classes[module.activation]().eval()
            if layer is not None:  # PReLU's learned slope
                act.weight.data = torch.from_numpy(layer.weight.copy())
            ops.append(act)

    def apply(x, strength: float):
        h = x
        for f in ops:
            h = f(h)
        return x + strength * h

    return apply


class A1111Attention:
    """A diffusers attention processor computing A1111's rule: context = encoder_hidden_states or, in
    self-attention, the (normalised) hidden states; k = to_k(c + s·f_k(c)), v = to_v(c + s·f_v(c)) with the
    module pair of c's width; then scaled dot-product attention as diffusers' AttnProcessor2_0."""

    def __init__(self, hn: Hypernetwork, strength: float):
        self.pairs = {w: tuple(map(torch_module, pair)) for w, pair in hn.modules.items()}
        self.strength = strength

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        import torch.nn.functional as F

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, N, C)
        ck = cv = context
        if (pair := self.pairs.get(context.shape[-1])) is not None:
            ck, cv = pair[0](context, self.strength), pair[1](context, self.strength)
        q, k, v = attn.to_q(hidden_states), attn.to_k(ck), attn.to_v(cv)
        b, heads = q.shape[0], attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # (B, heads, N, C/heads)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1])))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def applied(unet, hn: Hypernetwork, strength: float):
    """diffusers' UNet2DConditionModel with `hn` in every attention while inside; its processors restored."""
    before = unet.attn_processors
    unet.set_attn_processor(A1111Attention(hn, strength))
    try:
        yield unet
    finally:
        unet.set_attn_processor(before)


def check_variant(unet_dir: Path, hn: Hypernetwork, rewired: dict[str, list], feeds: dict[str, np.ndarray],
                  expected: np.ndarray | None = None) -> dict[str, float]:
    """The checks of the module docstring on each variant graph; raises ExportFailed. expected: torch's U-Net
    output with `hn` at CHECK_STRENGTH, when a torch U-Net is at hand. Returns {check: relative error}."""
    errors = {}
    for graph, variant in _variant_files(hn.name).items():
        if variant not in rewired:
            continue
        plain = OrtEngine(unet_dir / graph, names.UNET)(**feeds)[names.OUT_SAMPLE]
        engine = OrtEngine(unet_dir / variant, names.hypernet_component(hn.name), data_dir=unet_dir)
        off = engine(**feeds, **{names.HYPERNETWORK_STRENGTH: np.float32(0)})[names.OUT_SAMPLE]
        errors[f"{variant} at strength 0 vs {graph}"] = _within(verify.relative_error(off, plain), OFF_LIMIT,
                                                                 hn, variant, "at strength 0 differs from the plain U-Net")
        errors[f"{variant} modules vs torch"] = _check_modules(unet_dir, variant, hn, rewired[variant], feeds)
        if expected is not None:
            on = engine(**feeds, **{names.HYPERNETWORK_STRENGTH: np.float32(CHECK_STRENGTH)})[names.OUT_SAMPLE]
            errors[f"{variant} vs torch"] = _within(verify.relative_error(on, expected), verify.RELATIVE_ERROR_LIMIT,
                                                    hn, variant, "differs from torch's U-Net with the hypernetwork")
    return errors


def _within(error: float, limit: float, hn: Hypernetwork, variant: str, what: str) -> float:
    if not error <= limit:
        raise ExportFailed(f"hypernetwork {hn.name!r}: unet/{variant} {what} by relative error {error:.3g} "
                           f"(limit {limit:g}); nothing was added")
    return error


def _check_modules(unet_dir: Path, variant: str, hn: Hypernetwork, rewired: list, feeds: dict) -> float:
    """Each rewired context c and its c + s·f(c), read out of the graph, against the torch module on that c."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    model = onnx.load(str(unet_dir / variant), load_external_data=False)
    wanted = [t for context, new, *_ in rewired for t in (context, new) if t not in feeds]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in wanted)
    probe = unet_dir / names.HYPERNET_FOLDER / f".probe-{os.getpid()}-{hn.name}.onnx"
    try:
        onnx.save_model(model, str(probe))
        out = OrtEngine(probe, "hypernetwork probe", data_dir=unet_dir)(
            **feeds, **{names.HYPERNETWORK_STRENGTH: np.float32(CHECK_STRENGTH)})
    finally:
        probe.unlink(missing_ok=True)
    values = {**feeds, **out}
    modules = {w: tuple(map(torch_module, pair)) for w, pair in hn.modules.items()}
    worst = 0.0
    for context, new, kv, width in rewired:
        with torch.no_grad():
            ref = modules[width]["kv".index(kv)](torch.from_numpy(values[context]), CHECK_STRENGTH).numpy()
        worst = max(worst, verify.relative_error(values[new], ref))
    return _within(worst, verify.RELATIVE_ERROR_LIMIT, hn, variant, "computes a module unlike torch")


def bake_into(bundle: Path, hn: Hypernetwork, feeds: dict[str, np.ndarray], torch_unet=None, log=print) -> dict:
    """Write and check `hn`'s variants in `bundle` (a bundle being exported, or one that exists); on failure
    delete what was written. Returns the manifest entries: {"graphs", "cpu_graphs", "hypernetworks", "errors"}."""
    unet_dir, comp = bundle / names.UNET, names.hypernet_component(hn.name)
    try:
        rewired, widths = write_variant(unet_dir, hn)
        expected = None
        if torch_unet is not None:
            import torch

            with applied(torch_unet, hn, CHECK_STRENGTH), torch.no_grad():
                t = {k: torch.from_numpy(v) for k, v in feeds.items()}
                expected = torch_unet(t[names.SAMPLE], t[names.TIMESTEP],
                                      encoder_hidden_states=t[names.ENCODER_HIDDEN_STATES]).sample.numpy()
        errors = check_variant(unet_dir, hn, rewired, feeds, expected)
    except BaseException:
        remove_variant(unet_dir, hn.name)
        raise
    plain, cpu = (f"{names.UNET}/{rel}" for rel in _variant_files(hn.name).values())
    log(f"hypernetwork {hn.name}: {len(rewired[next(iter(rewired))])} attention inputs rewired (widths "
        f"{', '.join(map(str, widths))}) in {', '.join(rewired)}; {len(errors)} checks passed "
        f"({'modules and whole U-Net' if expected is not None else 'modules'} vs torch, strength 0 vs the plain "
        f"U-Net; worst relative error {max(errors.values()):.2e})")
    return {"graphs": {comp: graph_spec(bundle / plain, plain)},
            "cpu_graphs": {comp: cpu} if (bundle / cpu).is_file() else {},
            "hypernetworks": {hn.name: {"component": comp, "file": hn.path.name, "sha256": hn.sha256,
                                        "widths": widths}},
            "errors": {f"{comp}: {k}": v for k, v in errors.items()}}


def remove_variant(unet_dir: Path, name: str) -> None:
    """Delete what write_variant wrote for `name` (and the hypernet folder when that leaves it empty)."""
    for rel in [*_variant_files(name).values(), f"{names.HYPERNET_FOLDER}/{name}.onnx_data"]:
        (unet_dir / rel).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (unet_dir / names.HYPERNET_FOLDER).rmdir()  # only when empty


def read_all(files, allow_pickle: bool) -> list[Hypernetwork]:
    """The files of `--hypernetwork FILE ...`, read and checked before any export work starts."""
    out = []
    for f in files or []:
        hn = read_hypernetwork(f, allow_pickle)
        if any(h.name == hn.name for h in out):
            raise InvalidRequest(f"two hypernetwork files are named {hn.name!r}: each needs its own name (the file's "
                                 "stem is its <hypernet:NAME> tag); rename one")
        out.append(hn)
    return out


def check_feeds(manifest) -> dict[str, np.ndarray]:
    """The U-Net's check inputs for a bundle without its torch model, as the exporter draws them."""
    spec = manifest.graphs[names.UNET]
    if {t.name for t in spec.inputs} != {names.SAMPLE, names.TIMESTEP, names.ENCODER_HIDDEN_STATES}:
        raise InvalidRequest(f"this bundle's U-Net takes {[t.name for t in spec.inputs]}; hypernetworks can be "
                             "added to SD 1.x/2.x bundles (sample, timestep, encoder_hidden_states)")
    rng = np.random.default_rng(1234)
    h, w = manifest.default_height // manifest.vae_scale_factor, manifest.default_width // manifest.vae_scale_factor
    return {names.SAMPLE: rng.standard_normal((1, manifest.unet_in_channels, h, w), dtype=np.float32),
            names.TIMESTEP: np.array([321.0], dtype=np.float32),
            names.ENCODER_HIDDEN_STATES: rng.standard_normal((1, 2 * manifest.tokenizer_max_length,
                                                              manifest.text_hidden_size), dtype=np.float32)}


@contextlib.contextmanager
def _bundle_lock(bundle: Path):
    """An exclusive flock on the bundle's `.sdrt.lock`: two `hypernetwork add` never interleave manifest writes."""
    fd = os.open(bundle / ".sdrt.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_hypernetwork(bundle: str | Path, file: str | Path, allow_pickle: bool = False, log=print) -> str:
    """Bake hypernetwork `file` into an exported bundle (`sdrt hypernetwork add`); returns its name. The new
    files are written first and listed in sdrt.json last (atomically), so a failed add leaves the bundle as it was."""
    from ..runtime.manifest import FORMAT_VERSION, load_manifest

    bundle = Path(bundle).expanduser()
    hn = read_hypernetwork(file, allow_pickle)
    manifest = load_manifest(bundle)
    if not manifest.hashed or not (bundle / names.UNET / names.LORA_MAP_FILE).is_file():
        raise InvalidRequest(f"{str(bundle)!r} was not exported by this sdrt (an optimum folder or an older bundle: "
                             f"no unet/{names.LORA_MAP_FILE}); export it with `sdrt export SRC --out BUNDLE "
                             "--hypernetwork FILE`")
    if manifest.format_version != FORMAT_VERSION:
        raise InvalidRequest(f"{str(bundle)!r} has format version {manifest.format_version}; re-export it with "
                             "this sdrt to add hypernetworks")
    try:
        with _bundle_lock(bundle):
            _add_locked(bundle, hn, log)
    except OSError as e:  # a read-only bundle, a full disk: the manifest is written last, so it is unchanged
        raise OutputNotWritable(f"adding hypernetwork {hn.name!r} to {str(bundle)!r} failed ({e.strerror or e}); "
                                "the bundle was left as it was. Check the free space and permissions of its "
                                "folder") from None
    return hn.name


def _add_locked(bundle: Path, hn: Hypernetwork, log) -> None:
    from ..runtime.manifest import load_manifest

    manifest = load_manifest(bundle)  # again, under the lock: another add may have written it meanwhile
    known = manifest.hypernetworks.get(hn.name)
    if known is not None:
        if known["sha256"] != hn.sha256:
            raise InvalidRequest(f"{str(bundle)!r} already has a hypernetwork named {hn.name!r} from another file "
                                 f"(sha256 {known['sha256'][:10]}); rename the new file")
        log(f"hypernetwork {hn.name}: already in {bundle}")
        return
    entries = bake_into(bundle, hn, check_feeds(manifest), log=log)
    try:
        raw = json.loads((bundle / names.MANIFEST_FILE).read_text(encoding="utf-8"))
        manifest.graphs.update(entries["graphs"])
        manifest.cpu_graphs.update(entries["cpu_graphs"])
        manifest.hypernetworks.update(entries["hypernetworks"])
        for comp, spec in entries["graphs"].items():
            data_file = f"{names.UNET}/{names.HYPERNET_FOLDER}/{hn.name}.onnx_data"
            rels = [spec.path, entries["cpu_graphs"].get(comp), data_file]
            manifest.files.update({rel: sha256_file(bundle / rel) for rel in rels if rel})
        data = {**raw, **manifest.to_json()}
        data.setdefault("verification", {}).setdefault("errors", {}).update(entries["errors"])
        atomic_write_bytes(bundle / names.MANIFEST_FILE, (json.dumps(data, indent=2) + "\n").encode())
    except BaseException:  # the manifest is unchanged (atomic write): drop the unlisted files too
        remove_variant(bundle / names.UNET, hn.name)
        raise


def remove_hypernetwork(bundle: str | Path, name: str, log=print) -> None:
    """Take hypernetwork `name` out of a bundle (`sdrt hypernetwork remove`): sdrt.json first (atomically),
    then its files, so the bundle is valid at every moment."""
    from ..runtime.manifest import load_manifest

    bundle = Path(bundle).expanduser()
    load_manifest(bundle)  # a bundle, hashes intact
    try:
        with _bundle_lock(bundle):
            manifest = load_manifest(bundle)
            entry = manifest.hypernetworks.get(name)
            if entry is None:
                have = ", ".join(sorted(manifest.hypernetworks)) or "none"
                raise InvalidRequest(f"{str(bundle)!r} has no hypernetwork {name!r} (it has: {have})")
            comp = entry["component"]
            raw = json.loads((bundle / names.MANIFEST_FILE).read_text(encoding="utf-8"))
            gone = {manifest.graphs.pop(comp).path, manifest.cpu_graphs.pop(comp, None),
                    f"{names.UNET}/{names.HYPERNET_FOLDER}/{name}.onnx_data"} - {None}
            del manifest.hypernetworks[name]
            for rel in gone:
                manifest.files.pop(rel, None)
            data = {k: v for k, v in raw.items() if k != "hypernetworks"} | manifest.to_json()
            errors = data.get("verification", {}).get("errors", {})
            for key in [k for k in errors if k.startswith(f"{comp}: ")]:
                del errors[key]
            atomic_write_bytes(bundle / names.MANIFEST_FILE, (json.dumps(data, indent=2) + "\n").encode())
            remove_variant(bundle / names.UNET, name)
    except OSError as e:
        raise OutputNotWritable(f"removing hypernetwork {name!r} from {str(bundle)!r} failed ({e.strerror or e}); "
                                "check the permissions of its folder") from None
    log(f"removed hypernetwork {name} from {bundle}")
