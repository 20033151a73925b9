"""Where each LoRA-targetable weight lives in an exported graph, so the runtime can patch it without torch or onnx.

torch's exporter keeps a convolution's weight under its parameter name but constant-folds a linear layer's
weight into a transposed copy named like `onnx::MatMul_1640`. So the map is built by value: every
nn.Linear / nn.Conv2d weight is matched to the initializer holding it (as is, or transposed), and its place in
model.onnx_data (offset, length) is recorded. The runtime reads the base weight there, adds the LoRA delta in
numpy, and hands the result to ONNX Runtime as an initializer override.

lora_map.json: {module path: {"initializer", "transposed", "shape" (torch's), "dtype", "offset", "length"}}
"""
from __future__ import annotations

import hashlib

import numpy as np


def targets(module) -> dict[str, np.ndarray]:
    """module path (as diffusers/transformers name it) -> weight, for the layer kinds LoRA adapts."""
    import torch

    out = {}
    for path, layer in module.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and layer.weight is not None:
            out[path] = layer.weight.detach().float().numpy()
    return out


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def initializer_digests(model) -> dict[str, str]:
    """digest of an initializer's bytes -> its name; call before saving moves the bytes out."""
    from onnx import numpy_helper

    out: dict[str, str] = {}
    for init in model.graph.initializer:
        data = init.raw_data or numpy_helper.to_array(init).tobytes()
        out.setdefault(_digest(data), init.name)
    return out


def build(weights: dict[str, np.ndarray], digests: dict[str, str], saved_model) -> dict[str, dict]:
    """Match each weight to its initializer and locate it in the external data file of `saved_model`."""
    places = {init.name: {e.key: e.value for e in init.external_data} for init in saved_model.graph.initializer}
    out = {}
    for path, w in weights.items():
        for transposed, data in ((False, w), (True, w.T)):
            name = digests.get(_digest(np.ascontiguousarray(data).tobytes()))
            if name is not None and "offset" in places.get(name, {}):
                place = places[name]
                out[path] = {"initializer": name, "transposed": transposed, "shape": list(w.shape),
                             "dtype": "float32", "offset": int(place["offset"]), "length": int(place["length"])}
                break
    return out
