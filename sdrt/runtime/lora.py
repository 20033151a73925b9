"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") applied to exported graphs in
numpy: W' = W + sum_i weight_i * (alpha_i / rank_i) * up_i @ down_i, handed to ONNX Runtime as initializer
overrides, so no re-export. Clearing the LoRAs reopens the graphs on the base weights, which restores them
exactly.

File formats (as diffusers' `load_lora_weights` reads them):
* kohya-ss / AUTOMATIC1111: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
  text encoder `lora_te_text_model_<module>...`.
* diffusers / PEFT: `unet.<module>.lora_A.weight`, `.lora_B.weight` (scale 1: alpha = rank), text encoder
  `text_encoder.text_model.<module>...`; the older `<module>.lora.down.weight` / `.lora.up.weight` too.
Where each weight lives in the graph comes from the exporter's lora_map.json (sdrt/export/weight_map.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleCorrupt, InvalidRequest
from . import names

_KOHYA = re.compile(r"^lora_(unet|te)_(.+)\.(lora_down|lora_up)\.weight$")
_KOHYA_ALPHA = re.compile(r"^lora_(unet|te)_(.+)\.alpha$")
_PEFT = re.compile(r"^(unet|text_encoder)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
_COMPONENT = {"unet": names.UNET, "te": names.TEXT_ENCODER, "text_encoder": names.TEXT_ENCODER}
_DOWN = {"lora_down", "lora_A", "lora.down"}


@dataclass(frozen=True)
class Lora:
    path: Path
    weight: float


@dataclass
class _Pair:
    down: np.ndarray | None = None  # (r, in) or (r, in, kh, kw)
    up: np.ndarray | None = None  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None

    def delta(self, shape: tuple) -> np.ndarray:
        """up @ down * alpha / rank, in the layer's weight shape."""
        rank = self.down.shape[0]
        scale = (self.alpha if self.alpha is not None else rank) / rank
        d = self.up.reshape(self.up.shape[0], rank) @ self.down.reshape(rank, -1)  # (out, in*kh*kw)
        return (d * scale).reshape(shape)


class LoraMap:
    """A component's lora_map.json plus the model.onnx_data it points into (memory-mapped)."""

    def __init__(self, folder: Path):
        self.entries = json.loads((folder / names.LORA_MAP_FILE).read_text(encoding="utf-8"))
        self.data = np.memmap(folder / names.EXTERNAL_DATA_FILE, dtype=np.uint8, mode="r")
        self.by_kohya_name = {path.replace(".", "_"): path for path in self.entries}

    def module(self, name: str, kohya: bool) -> str | None:
        name = name.removeprefix("text_model." if not kohya else "text_model_")
        return self.by_kohya_name.get(name) if kohya else (name if name in self.entries else None)

    def base(self, module: str) -> np.ndarray:
        """The base weight in torch's layout (out, in[, kh, kw])."""
        e = self.entries[module]
        raw = self.data[e["offset"]: e["offset"] + e["length"]].view(e["dtype"])
        shape = tuple(e["shape"])
        return raw.reshape(shape[::-1]).T if e["transposed"] else raw.reshape(shape)


def read_lora_file(path: Path) -> dict[tuple[str, str, bool], _Pair]:
    """(component, module name as the file spells it, kohya?) -> the pair of low-rank factors."""
    from safetensors.numpy import load_file

    if Path(path).suffix.lower() != ".safetensors":
        raise InvalidRequest(f"LoRA file {str(path)!r} is not .safetensors (LoRAs are read from safetensors only)")
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise InvalidRequest(f"LoRA file {str(path)!r} does not exist") from None
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise InvalidRequest(f"LoRA file {str(path)!r} is not a readable safetensors file ({e})") from None
    pairs: dict[tuple[str, str, bool], _Pair] = {}
    for key, value in tensors.items():
        if m := _KOHYA_ALPHA.match(key):
            pairs.setdefault((_COMPONENT[m[1]], m[2], True), _Pair()).alpha = float(value)
        elif m := _KOHYA.match(key) or _PEFT.match(key):
            pair = pairs.setdefault((_COMPONENT[m[1]], m[2], key.startswith("lora_")), _Pair())
            setattr(pair, "down" if m[3] in _DOWN else "up", value.astype(np.float32))
    complete = {k: p for k, p in pairs.items() if p.down is not None and p.up is not None}
    if not complete:
        raise InvalidRequest(f"{str(path)!r} holds no LoRA weights sdrt knows (kohya lora_unet_*/lora_te_*, "
                             "or diffusers/PEFT unet.*/text_encoder.* with lora_A/lora_B)")
    return complete


def overrides(bundle: Path, loras: list[Lora]) -> dict[str, dict[str, np.ndarray]]:
    """component -> {initializer name: patched weight in the graph's layout}."""
    maps: dict[str, LoraMap] = {}
    patched: dict[str, dict[str, np.ndarray]] = {}  # component -> module -> torch-layout weight
    for lora in loras:
        for (comp, name, kohya), pair in read_lora_file(lora.path).items():
            if comp not in maps:
                maps[comp] = _open_map(bundle, comp)
            module = maps[comp].module(name, kohya)
            if module is None:
                raise InvalidRequest(f"LoRA {lora.path.name!r} targets {name!r}, which this model's "
                                     f"{comp} does not have (a LoRA for another model family?)")
            current = patched.setdefault(comp, {})
            base = current.get(module)
            if base is None:
                base = maps[comp].base(module).astype(np.float32)
            delta = pair.delta(base.shape)
            current[module] = base + np.float32(lora.weight) * delta
    return {comp: {maps[comp].entries[m]["initializer"]: _graph_layout(w, maps[comp].entries[m])
                   for m, w in mods.items()} for comp, mods in patched.items()}


def _graph_layout(w: np.ndarray, entry: dict) -> np.ndarray:
    return np.ascontiguousarray(w.T if entry["transposed"] else w, dtype=np.float32)


def _open_map(bundle: Path, comp: str) -> LoraMap:
    folder = bundle / comp
    if not (folder / names.LORA_MAP_FILE).is_file():
        raise InvalidRequest(f"this bundle's {comp} has no {names.LORA_MAP_FILE} (an optimum export or an older "
                             "sdrt bundle): re-export it with `sdrt export` to use LoRAs")
    try:
        return LoraMap(folder)
    except (OSError, ValueError) as e:
        raise BundleCorrupt(f"{str(folder / names.LORA_MAP_FILE)!r} or its weights are unreadable ({e}); "
                            "re-export the bundle") from None


_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?>")


def parse_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """AUTOMATIC1111's `<lora:name:0.8>` extra-network tags: the prompt without them, and (name, weight)s."""
    tags = []
    for m in _TAG.finditer(prompt):
        try:
            tags.append((m[1].strip(), float(m[2]) if m[2] not in (None, "") else 1.0))
        except ValueError:
            raise InvalidRequest(f"LoRA tag {m[0]!r} has weight {m[2]!r}, not a number; "
                                 "write it as <lora:name:0.8>") from None
    return _TAG.sub("", prompt), tags


def resolve(name: str, folders: list[Path]) -> Path:
    """A tag's name -> NAME.safetensors in the first LoRA folder that has it. The name is looked up among the
    folders' files, never joined into a path: a prompt (a server's client) can't reach outside them."""
    for folder in folders:
        path = listing(folder).get(name)
        if path is not None:
            return path
    where = ", ".join(str(f) for f in folders) or "no folder (pass --lora-dir)"
    raise InvalidRequest(f"LoRA {name!r} from the prompt was not found as {name}.safetensors in {where}")


def listing(folder: Path) -> dict[str, Path]:
    """The LoRA files of a folder by tag name (the file name without .safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name[: -len(".safetensors")]: p for p in sorted(folder.iterdir())
            if p.name.endswith(".safetensors") and p.is_file()}
