"""Trace one component to ONNX: what is traced (module, example inputs, names, dynamic axes) is the model
family's (export/families), how is here.

Uses torch's TorchScript-based exporter (`dynamo=False`): on these models it is fast and exact, and it keeps
shape arithmetic symbolic.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

from ..runtime import names
from ..runtime.manifest import GraphSpec, TensorSpec

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights above which a graph keeps them beside it (protobuf's 2 GB cap)


def export_onnx(module, inputs, input_names, output_names, dynamic_axes, out_dir: Path,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD, lora_targets: bool = False,
                external: bool = False) -> Path:
    """Trace `module` to out_dir/model.onnx; weights over the threshold go to one model.onnx_data beside it.
    `lora_targets`: always keep the weights in model.onnx_data and write lora_map.json (see weight_map.py).
    `external`: always keep them there (a CPU graph beside it reads them too)."""
    import onnx
    import torch

    from . import weight_map

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python branches: see the module docstring
        raw = Path(scratch) / names.MODEL_FILE
        torch.onnx.export(module, inputs, str(raw), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))  # pulls in any external data torch wrote for a > 2 GB model
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    target = out_dir / names.MODEL_FILE
    digests = weight_map.initializer_digests(model) if lora_targets else {}
    if size > external_threshold or lora_targets or external:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=names.EXTERNAL_DATA_FILE, size_threshold=0 if lora_targets else 1024)
    else:
        onnx.save_model(model, str(target))
    if lora_targets:
        saved = onnx.load(str(target), load_external_data=False)
        mapping = weight_map.build(weight_map.targets(module.m), digests, saved)
        (out_dir / names.LORA_MAP_FILE).write_text(json.dumps(mapping, indent=1) + "\n")
    return target


def _tensor_specs(values) -> tuple[TensorSpec, ...]:
    from onnx.helper import tensor_dtype_to_np_dtype

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        out.append(TensorSpec(v.name, str(tensor_dtype_to_np_dtype(t.elem_type)), shape))
    return tuple(out)


def graph_spec(path: Path, rel: str) -> GraphSpec:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return GraphSpec(rel, _tensor_specs(model.graph.input), _tensor_specs(model.graph.output))
