"""fp32 ONNX graph -> fp16 graph for a strongly typed TensorRT network.

TensorRT >= 10 is moving to strongly typed networks (weak typing is deprecated in 10.12, and TensorRT 11
builds every network strongly typed, without the FP16 builder flag): each tensor runs in the type the graph
gives it. So precision is decided here, in the graph: every floating-point op runs in fp16, except

- normalizations (LayerNormalization, InstanceNormalization = GroupNorm as torch exports it, GroupNormalization):
  their mean and variance over thousands of values overflow or lose too much in fp16;
- the sinusoidal timestep embedding (nodes under `/time_proj/`): sin(t·f) with t up to 999 needs fp32, as
  diffusers computes it in fp32 even in fp16 pipelines;
- ops whose float inputs are indices or scales (Range, CumSum; Resize's roi/scales inputs).

Graph inputs and outputs stay fp32 (casts are inserted), so the runtime feeds the same arrays to an fp16 or
fp32 engine. Type-correct by construction: every float input of a node is cast to the node's precision when
its producer runs in the other one, so no shape inference is trusted for correctness (it only supplies the
types of intermediate tensors).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FP32_OPS = {"LayerNormalization", "InstanceNormalization", "GroupNormalization", "Range", "CumSum",
            "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
FP32_NAME_PARTS = ("/time_proj/",)
FP32_INPUT_SLOTS = {"Resize": {1, 2}, "Upsample": {1}}  # roi / scales stay float32 whatever the data's type
ANY_TYPE_OPS = {"Cast", "Shape", "Size"}  # read any input type: never cast their inputs
FP16_MAX = 65504.0


def _is_low(node) -> bool:
    has_subgraph = any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)
    return not (node.op_type in FP32_OPS or has_subgraph or any(p in node.name for p in FP32_NAME_PARTS))


def _half(array: np.ndarray) -> np.ndarray:
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)  # saturate instead of overflowing to inf


def _types(model) -> dict[str, int]:
    """Element type of every named tensor we can know: inputs, initializers, inferred value_info, outputs."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _output_type(node, types: dict[str, int], TP) -> int:
    """Fallback when shape inference left a tensor untyped: the first typed input's type."""
    if node.op_type in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin"):
        return TP.INT64
    if node.op_type in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or",
                        "IsNaN", "IsInf"):
        return TP.BOOL
    typed = [types[i] for i in node.input if i and types.get(i)]
    return next((t for t in typed if t in (TP.FLOAT, TP.FLOAT16)), typed[0] if typed else TP.UNDEFINED)


def convert_model(model):
    """Convert `model` (an onnx ModelProto with its weights loaded) in place; returns it."""
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    g = model.graph
    types = _types(model)
    inits = {t.name: t for t in g.initializer}
    floats = (TP.FLOAT, TP.FLOAT16)
    outputs = {o.name for o in g.output}
    new_nodes, casts, rename, new_inits = [], {}, {}, []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            if name in inits and to == TP.FLOAT16:  # a weight: store it in fp16 instead of casting at run time
                out = f"{name}__fp16"
                new_inits.append(numpy_helper.from_array(_half(numpy_helper.to_array(inits[name])), out))
            else:
                out = f"{name}__to{'fp16' if to == TP.FLOAT16 else 'fp32'}"
                new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}__cast"))
            casts[key] = out
            types[out] = to
        return casts[key]

    for node in g.node:
        low = _is_low(node)
        want = TP.FLOAT16 if low else TP.FLOAT
        keep = FP32_INPUT_SLOTS.get(node.op_type, set())
        for i, name in enumerate(node.input):
            name = rename.get(name, name)
            node.input[i] = name
            if name and types.get(name) in floats and node.op_type not in ANY_TYPE_OPS:
                target = TP.FLOAT if i in keep else want
                if types[name] != target:
                    node.input[i] = cast(name, target)
        _retype_attributes(node, low, TP, numpy_helper)
        for j, out in enumerate(node.output):
            t = types.get(out) or _output_type(node, types, TP)
            if t == TP.FLOAT and low:
                t = TP.FLOAT16
            if t == TP.FLOAT16 and out in outputs:  # graph outputs stay fp32: compute into a renamed tensor
                node.output[j] = rename[out] = f"{out}__fp16"
                types[node.output[j]] = t
            types[out] = t
        new_nodes.append(node)
    for o in g.output:
        if o.name in rename:
            new_nodes.append(helper.make_node("Cast", [rename[o.name]], [o.name], to=TP.FLOAT, name=f"{o.name}__out"))
    _replace(g, new_nodes, new_inits)
    return model


def _retype_attributes(node, low: bool, TP, numpy_helper) -> None:
    """Casts to float, constants and ConstantOfShape values take the node's precision."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == TP.FLOAT and low:
            a.i = TP.FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and low \
                and a.t.data_type == TP.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(a.t)), a.t.name))


def _replace(g, nodes, new_inits) -> None:
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # types changed; TensorRT and ONNX Runtime infer them again


def convert_file(src: Path, dst_dir: Path, data_dir: Path | None = None, fp16: bool = True) -> Path:
    """src (model.onnx, weights beside it or in data_dir) -> dst_dir/model.onnx + model.onnx_data in fp16 (or,
    fp16=False, as it is: a hypernetwork variant's weights gathered beside it for TensorRT's parser). Works for
    graphs over 2 GB: shape inference runs file to file, and the weights are saved as external data."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    dst_dir.mkdir(parents=True, exist_ok=True)
    inferred = dst_dir / "inferred.onnx"
    try:
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
    except Exception:  # noqa: BLE001 - inference is only a source of types; convert_model does without it
        model = onnx.load(str(src), load_external_data=False)
    finally:
        inferred.unlink(missing_ok=True)
    load_external_data_for_model(model, str(data_dir or src.parent))
    if fp16:
        convert_model(model)
    out = dst_dir / "model.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    return out
