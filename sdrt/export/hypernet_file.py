"""AUTOMATIC1111's hypernetwork files (`.pt`, NovelAI's technique), read with numpy: no torch needed.

The format, as A1111's `modules/hypernetworks/hypernetwork.py` writes (`Hypernetwork.save`) and reads it
(`Hypernetwork.load`; ../shared/reference/hypernetworks-controlnet.md, part A):

* int keys, one per feature width (320, 640, 768, 1024, 1280): a pair of state dicts (K module, V module);
  a module is `torch.nn.Sequential` named `linear`: Linear, then the activation (none for "linear"; none
  after the last Linear unless `activate_output`), then LayerNorm (`is_layer_norm`), then Dropout, per
  layer. Parameterless entries take an index too, so keys are `linear.<index>.weight|bias` with gaps;
  the first files used `linear1.*` / `linear2.*` (A1111's `fix_old_state_dict`).
* `activation_func` (missing: linear), `is_layer_norm` (False), `activate_output` (missing: True, as A1111;
  ComfyUI reads it as False), `layer_structure`, dropout settings (nothing at inference), metadata.

A module computes x + s * f(x), f its Sequential; A1111 applies the K module to what to_k reads and the V
module to what to_v reads, in every attention whose context has the module's width.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidRequest, PickleRefused
from ..runtime.fsutil import sha256_file
from ..runtime.torch_pickle import read_torch_pickle

# A1111's activation_dict: its explicit names, and the torch activations it adds by lower-cased class name
# that can be built without arguments and keep the width. "swish" is Hardswish there, not SiLU.
ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "gelu", "silu", "mish",
               "softsign", "softplus", "selu", "celu", "relu6", "hardtanh", "hardsigmoid", "hardswish",
               "prelu", "logsigmoid", "tanhshrink", "hardshrink", "softshrink", "rrelu")
NAME = re.compile(r"^[\w.\-]+$")  # a file stem usable as a tag, a folder entry and an engine file name
_KEY = re.compile(r"^linear\.(\d+)\.(weight|bias)$")
_LEGACY = {"linear1": 0, "linear2": 1}


@dataclass(frozen=True)
class Layer:
    kind: str  # "linear" (weight (out, in), bias (out,)), "layer_norm" (weight, bias (n,)) or "prelu" (weight (1,))
    weight: np.ndarray
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class Module:
    """f of x + s * f(x): `layers` in Sequential order, `activation` after each Linear but (unless
    `activate_output`) the last, before that Linear's LayerNorm."""

    layers: tuple[Layer, ...]
    activation: str
    activate_output: bool

    def steps(self):
        """(op, Layer or None) in the order the module computes them: ("linear", l), ("act", None|prelu), ("ln", l)."""
        linears = [i for i, layer in enumerate(self.layers) if layer.kind == "linear"]
        out = []
        for i, layer in enumerate(self.layers):
            if layer.kind == "linear":
                out.append(("linear", layer))
                last = i == linears[-1]
                if self.activation != "linear" and (self.activate_output or not last):
                    nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
                    out.append(("act", nxt if nxt is not None and nxt.kind == "prelu" else None))
            elif layer.kind == "layer_norm":
                out.append(("ln", layer))
        return out


@dataclass(frozen=True)
class Hypernetwork:
    name: str  # the file's stem, as A1111 names it (and the <hypernet:name> tag)
    path: Path
    sha256: str  # of the whole file; A1111's shorthash is its first 10 hex digits
    modules: dict[int, tuple[Module, Module]]  # width -> (K module, V module), each with its activation

    @property
    def widths(self) -> list[int]:
        return sorted(self.modules)


def read_hypernetwork(path: str | Path, allow_pickle: bool = False) -> Hypernetwork:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"hypernetwork file {str(path)!r} does not exist")
    if path.suffix.lower() != ".pt":
        raise InvalidRequest(f"hypernetwork file {str(path)!r} is not a .pt file (A1111's hypernetwork format)")
    if not NAME.match(path.stem):
        raise InvalidRequest(f"hypernetwork file name {path.stem!r} has characters other than letters, digits, "
                             "'_', '.' and '-'; rename the file (its stem is the name <hypernet:NAME> uses)")
    if not allow_pickle:
        raise PickleRefused(f"{str(path)!r} is a pickle (A1111 hypernetworks are), which can run arbitrary code when "
                            "loaded; pass --allow-pickle (allow_pickle=True) if you trust it")
    data = read_torch_pickle(path, "hypernetwork")
    return parse(data, path)


def parse(data: dict, path: Path) -> Hypernetwork:
    where = f"hypernetwork {str(path)!r}"
    activation = data.get("activation_func") or "linear"
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise InvalidRequest(f"{where} uses activation {activation!r}, which sdrt does not know; "
                             f"known: {', '.join(ACTIVATIONS)}")
    activation = activation.lower()
    # is_layer_norm is not read: the LayerNorms' own weights (1-D, between the Linears) say where they are
    activate_output = bool(data.get("activate_output", True))  # A1111's default for files without the key
    modules = {}
    for width, pair in data.items():
        if not isinstance(width, int) or isinstance(width, bool):
            continue  # A1111 loads only the int keys
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(d, dict) for d in pair):
            what = "a tensor" if isinstance(pair, np.ndarray) else f"a {type(pair).__name__}"
            raise InvalidRequest(f"{where}: width {width} holds {what}, not a (K, V) pair of state dicts")
        modules[width] = tuple(_module(sd, width, activation, activate_output, f"{where}, width {width} {kv}")
                               for sd, kv in zip(pair, ("K", "V")))
    if not modules:
        raise InvalidRequest(f"{where} holds no modules (no integer width keys such as 768); is it a hypernetwork?")
    return Hypernetwork(path.stem, path, sha256_file(path), modules)


def _module(state: dict, width: int, activation: str, activate_output: bool, where: str) -> Module:
    """The Sequential's parameter layers in index order, checked to chain from `width` back to `width`."""
    by_index: dict[int, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        key = str(key)
        legacy = key.split(".")[0]
        if legacy in _LEGACY and key.count(".") == 1:  # linear1.weight -> linear.0.weight
            key = f"linear.{_LEGACY[legacy]}.{key.split('.')[1]}"
        m = _KEY.match(key)
        if m is None or not isinstance(value, np.ndarray):
            raise InvalidRequest(f"{where}: unexpected entry {key!r}; expected linear.<index>.weight/bias tensors")
        by_index.setdefault(int(m[1]), {})[m[2]] = np.asarray(value, np.float32)
    layers = []
    for index in sorted(by_index):
        p = by_index[index]
        w, b = p.get("weight"), p.get("bias")
        if w is not None and w.ndim == 2 and b is not None and b.shape == (w.shape[0],):
            layers.append(Layer("linear", w, b))
        elif w is not None and w.ndim == 1 and b is not None and b.shape == w.shape:
            layers.append(Layer("layer_norm", w, b))
        elif w is not None and w.shape == (1,) and b is None and activation == "prelu":
            layers.append(Layer("prelu", w))
        else:
            shapes = {k: list(v.shape) for k, v in p.items()}
            raise InvalidRequest(f"{where}: layer linear.{index} has {shapes}, which is neither a Linear "
                                 "(weight (out, in), bias (out,)) nor a LayerNorm")
    if not layers or layers[0].kind != "linear":
        raise InvalidRequest(f"{where}: the module does not start with a Linear layer")
    size = width
    for layer in layers:
        want = size if layer.kind == "linear" else None
        if layer.kind == "linear":
            if layer.weight.shape[1] != want:
                raise InvalidRequest(f"{where}: a Linear takes {layer.weight.shape[1]} features where {want} arrive")
            size = layer.weight.shape[0]
        elif layer.kind == "layer_norm" and layer.weight.shape[0] != size:
            raise InvalidRequest(f"{where}: a LayerNorm of {layer.weight.shape[0]} features after {size}")
    if size != width:
        raise InvalidRequest(f"{where}: the module ends with {size} features, not its width {width}")
    for layer in layers:
        for array in (layer.weight, layer.bias):
            if array is not None and not np.isfinite(array).all():
                raise InvalidRequest(f"{where}: a weight holds NaN or Inf")
    return Module(tuple(layers), activation, activate_output)


def check_widths(hn: Hypernetwork, block_widths: set[int], text_width: int) -> list[int]:
    """The widths of `hn` this model has (what it will change). Refuses a file made for another family: its
    text-width module (one that is no U-Net block width) is not this model's text width, or nothing applies.
    A module of a width the model lacks is skipped, as A1111 does (its UI adds 1024 to SD 1.x files)."""
    model = block_widths | {text_width}
    text = [w for w in hn.widths if w not in block_widths]
    used = [w for w in hn.widths if w in model]
    if (text and text_width not in hn.widths) or not used:
        raise InvalidRequest(
            f"hypernetwork {hn.name!r} has modules for widths {hn.widths}; this model's attention layers have "
            f"widths {sorted(block_widths)} and text width {text_width}: it was made for another model family "
            f"(768: SD 1.x, 1024: SD 2.x)")
    return used
