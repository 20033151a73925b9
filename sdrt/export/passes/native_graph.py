"""sdrt's own operators in the U-Net's CPU graph (domain ai.sdrt; kernels in runtime/engines/native/).

Each is written as a node of the ai.sdrt domain plus an ONNX function of the same name whose body is the
operators it replaces, so one graph serves two cases: where runtime/engines/native_ops.py could build the library,
ONNX Runtime runs sdrt's kernel; elsewhere it inlines the function, and computes exactly what the graph
computed before the rewrite.

- Attention(q, k, v; num_heads, scale): the com.microsoft MultiHeadAttention it stands for; cpu_graph.py's
  trace writes it for small heads.
- GroupNorm / GroupNormSiLU(x, gamma, beta; groups, epsilon): torch's group_norm (Reshape,
  InstanceNormalization, Reshape, Mul, Add), and for the SiLU form the Sigmoid and Mul after it;
  fuse_group_norms() rewrites them after the trace.
"""
from __future__ import annotations

from ...runtime import names
from ...runtime.engines.ort import OrtEngine, weight_bytes

DOMAIN = "ai.sdrt"
OPSET = 17  # the body's standard operators (the exporter's opset, trace.OPSET)


def attention_function():
    import onnx
    from onnx import helper

    core = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft")
    core.attribute.extend([helper.make_attribute_ref("num_heads", onnx.AttributeProto.INT),
                           helper.make_attribute_ref("scale", onnx.AttributeProto.FLOAT)])
    return helper.make_function(DOMAIN, "Attention", ["q", "k", "v"], ["out"], [core],
                                [helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("", OPSET)],
                                attributes=["num_heads", "scale"])


def group_norm_function(silu: bool):
    """torch's export of group_norm, with the group count and epsilon taken from the node's attributes."""
    import onnx
    from onnx import TensorProto, helper

    groups = helper.make_node("Constant", [], ["g"])
    groups.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT))
    groups.attribute[0].ref_attr_name = "groups"
    norm = helper.make_node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normed"])
    norm.attribute.append(helper.make_attribute_ref("epsilon", onnx.AttributeProto.FLOAT))
    body = [
        groups,
        helper.make_node("Constant", [], ["axis0"], value_ints=[0]),
        helper.make_node("Unsqueeze", ["g", "axis0"], ["g1"]),
        helper.make_node("Constant", [], ["keep"], value_ints=[0]),
        helper.make_node("Constant", [], ["rest"], value_ints=[-1]),
        helper.make_node("Concat", ["keep", "g1", "rest"], ["grouping"], axis=0),  # [0, groups, -1]
        helper.make_node("Reshape", ["x", "grouping"], ["grouped"]),  # (N, groups, C/groups * spatial)
        helper.make_node("ConstantOfShape", ["g1"], ["ones"],
                         value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ConstantOfShape", ["g1"], ["zeros"],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        norm,
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Reshape", ["normed", "shape"], ["back"]),  # (N, C, ...)
        helper.make_node("Mul", ["back", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["affine" if silu else "out"]),
    ]
    if silu:
        body += [helper.make_node("Sigmoid", ["affine"], ["gate"]),
                 helper.make_node("Mul", ["affine", "gate"], ["out"])]
    return helper.make_function(DOMAIN, "GroupNormSiLU" if silu else "GroupNorm", ["x", "gamma", "beta"], ["out"],
                                body, [helper.make_opsetid("", OPSET)], attributes=["groups", "epsilon"])


def add_functions(model) -> None:
    """Declare every ai.sdrt operator the graph uses as a function, and the domains those need."""
    from onnx import helper

    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    makers = {"Attention": attention_function, "GroupNorm": lambda: group_norm_function(False),
              "GroupNormSiLU": lambda: group_norm_function(True)}
    have = {f.name for f in model.functions if f.domain == DOMAIN}
    model.functions.extend(makers[op]() for op in sorted(used - have))
    needed = ({DOMAIN} if used else set()) | ({"com.microsoft"} if "Attention" in used else set())
    for domain in needed - {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(domain, 1))


def fuse_group_norms(model) -> int:
    """Rewrite each of torch's group_norm patterns (and a SiLU right after it) as one ai.sdrt node; the count."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = _constants(graph)
    sole = lambda name: consumers[name][0] if len(consumers.get(name, [])) == 1 else None
    before, replaced = {}, set()  # id(node) -> the fused node that takes its place; ids of nodes removed
    for norm in graph.node:
        if norm.op_type == "InstanceNormalization":
            match = _group_norm_at(norm, producer, consumers, constants, sole)
            if match is not None:
                chain, node = match
                before[id(chain[4])] = node  # where the Add was: every input exists by then
                replaced.update(id(n) for n in chain)
    nodes = [m for n in graph.node for m in ([before[id(n)]] if id(n) in before else []) +
             ([] if id(n) in replaced else [n])]
    del graph.node[:]
    graph.node.extend(_live(nodes, {o.name for o in graph.output}))
    add_functions(model)
    return len(before)


def group_norms(model, ctx):
    """The pass (a PassContext): `fuse_group_norms` in a U-Net that ONNX Runtime runs on one thread per call,
    where sdrt's single-threaded kernel pays (OrtEngine's own test of a small model); others pass through."""
    if ctx.component in names.UNET_SHAPED and weight_bytes(ctx.plain_graph) <= OrtEngine.SPLIT_MAX_WEIGHT_BYTES:
        ctx.counts["group norms"] = fuse_group_norms(model)
    return model


def _group_norm_at(norm, producer, consumers, constants, sole):
    """(the pattern's nodes, the ai.sdrt node replacing them) for the group_norm around this
    InstanceNormalization, or None where the graph is not exactly torch's pattern."""
    from onnx import helper

    first = producer.get(norm.input[0])
    scale, shift = constants.get(norm.input[1]), constants.get(norm.input[2])
    if first is None or first.op_type != "Reshape" or sole(first.output[0]) is not norm or scale is None or \
            shift is None:
        return None
    groups = scale.size
    grouping = constants.get(first.input[1])
    if grouping is None or list(grouping) != [0, groups, -1] or not (scale == 1).all() or not (shift == 0).all():
        return None
    back = sole(norm.output[0])
    shape = producer.get(back.input[1]) if back is not None and back.op_type == "Reshape" else None
    if shape is None or shape.op_type != "Shape" or shape.input[0] != first.input[0]:
        return None
    mul = sole(back.output[0])
    add = sole(mul.output[0]) if mul is not None and mul.op_type == "Mul" else None
    if add is None or add.op_type != "Add":
        return None
    gamma = next((i for i in mul.input if i != back.output[0]), None)
    beta = next((i for i in add.input if i != mul.output[0]), None)
    if gamma not in constants or beta not in constants:
        return None
    chain, out = [first, norm, back, mul, add], add.output[0]
    after = consumers.get(out, [])  # SiLU: Sigmoid(y) and Mul(y, Sigmoid(y)), nothing else reading y
    sig = next((c for c in after if c.op_type == "Sigmoid"), None)
    gate = sole(sig.output[0]) if sig is not None else None
    if len(after) == 2 and gate is not None and gate.op_type == "Mul" and set(gate.input) == {out, sig.output[0]}:
        chain, out = chain + [sig, gate], gate.output[0]
    eps = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
    op = "GroupNormSiLU" if len(chain) == 7 else "GroupNorm"
    return chain, helper.make_node(op, [first.input[0], gamma, beta], [out], name=f"{norm.name}/sdrt",
                                   domain=DOMAIN, groups=groups, epsilon=eps)


def _constants(graph, max_elements: int = 1 << 16) -> dict:
    """name -> value of the graph's small initializers and Constant nodes (norm weights, shapes; not the
    convolution and projection weights, which a full-size U-Net holds gigabytes of)."""
    from math import prod

    from onnx import numpy_helper

    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(n.output[0], n.attribute[0].t) for n in graph.node
                if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    out = {name: numpy_helper.to_array(t) for name, t in tensors if prod(t.dims) <= max_elements}
    for n in graph.node:  # torch writes a weight equal to an earlier one (norms' initial 1s) as Identity of it
        if n.op_type == "Identity" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
    return out


def _live(nodes: list, outputs: set[str]) -> list:
    """nodes without those whose every output is unused (the rewrite's orphaned Shape and Constant nodes)."""
    needed = set(outputs)
    live = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    return live[::-1]
