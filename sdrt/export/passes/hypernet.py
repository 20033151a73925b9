"""A hypernetwork baked into a U-Net graph: every attention's to_k and to_v read c + s * MLP(c) instead of c.

A1111's rule (modules/sd_hijack_optimizations.py; ../shared/reference/hypernetworks-controlnet.md, A2): in
every attention, context = encoder_hidden_states for cross-attention and the normalised hidden states for
self-attention; k = to_k(c + s * MLP_k(c)), v = to_v(c + s * MLP_v(c)), with the (K, V) module pair of the
context's width and `s` the strength; attentions of other widths are untouched. So the modules act inside
every step and cannot be applied outside the U-Net.

How: the pass edits an exported graph instead of tracing the U-Net again, so it works on a bundle with no
torch model at hand (`sdrt hypernetwork add`) and on both of its U-Net graphs (the plain one, for TensorRT
and the CUDA provider, and the CPU graph with its fused attention). The bundle's lora_map.json says which
MatMul is each attention's to_k / to_v (by the weight it multiplies by); the pass inserts the module in front
of it. The graph keeps every initializer under its own name, pointing into the U-Net's model.onnx_data, so
the variant holds no copy of the U-Net's weights and a LoRA patch (by initializer name) reaches it. The
strength is the scalar input `hypernetwork_strength`.

A stack (several files in order, as A1111 applies several <hypernet:...> tags) chains the modules: the K
input becomes c_K = c; c_K = c_K + s_i * MLP_K,i(c_K) for each member i that has the width, V alike; member i
reads its strength from `hypernetwork_strength` (i = 0) or `hypernetwork_strength_<i>`.
"""
from __future__ import annotations

import numpy as np

from ...runtime.names import strength_input
from ..hypernet_file import Hypernetwork, Module

PREFIX = "hypernet"  # node and initializer names the pass adds start with it


def attention_layers(lora_map: dict) -> list[str]:
    """Module paths of the attentions (those with both to_k and to_v), in lora_map order."""
    return [path[: -len(".to_k")] for path in lora_map
            if path.endswith(".to_k") and path[: -len(".to_k")] + ".to_v" in lora_map]


class _Writer:
    """Collects the nodes and weights the pass adds."""

    def __init__(self, tag: str):
        self.tag, self.nodes, self.weights, self.n = tag, [], {}, 0

    def name(self, what: str) -> str:
        self.n += 1
        return f"{PREFIX}/{self.tag}/{what}_{self.n}"

    def weight(self, key: str, value: np.ndarray) -> str:
        name = f"{PREFIX}.{key}"
        self.weights[name] = np.ascontiguousarray(value, np.float32)
        return name

    def const(self, value: float) -> str:
        """A scalar constant, named by its value: the plain and CPU graphs' bakes then name every weight alike."""
        return self.weight(f"{self.tag}.const.{value!r}", np.array(value))

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _activation(w: _Writer, x: str, name: str, prelu) -> str:
    """torch's activation `name` (A1111's activation_dict; eval mode) as ONNX operators (opset 17)."""
    simple = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softsign": "Softsign", "softplus": "Softplus",
              "selu": "Selu", "swish": "HardSwish", "hardswish": "HardSwish"}
    if name in simple:
        return w.op(simple[name], [x])
    if name in ("leakyrelu", "rrelu"):  # rrelu in eval: the mean of its default bounds 1/8 and 1/3
        return w.op("LeakyRelu", [x], alpha=0.01 if name == "leakyrelu" else (1 / 8 + 1 / 3) / 2)
    if name in ("elu", "celu"):
        return w.op("Elu" if name == "elu" else "Celu", [x], alpha=1.0)
    if name in ("relu6", "hardtanh"):
        lo, hi = (0.0, 6.0) if name == "relu6" else (-1.0, 1.0)
        return w.op("Clip", [x, w.const(lo), w.const(hi)])
    if name == "hardsigmoid":
        return w.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    if name == "gelu":  # torch's exact GELU: x/2 * (1 + erf(x / sqrt 2))
        erf = w.op("Erf", [w.op("Mul", [x, w.const(2 ** -0.5)])])
        return w.op("Mul", [w.op("Mul", [x, w.const(0.5)]), w.op("Add", [erf, w.const(1.0)])])
    if name == "silu":
        return w.op("Mul", [x, w.op("Sigmoid", [x])])
    if name == "mish":
        return w.op("Mul", [x, w.op("Tanh", [w.op("Softplus", [x])])])
    if name == "logsigmoid":
        return w.op("Neg", [w.op("Softplus", [w.op("Neg", [x])])])
    if name == "tanhshrink":
        return w.op("Sub", [x, w.op("Tanh", [x])])
    if name in ("hardshrink", "softshrink"):
        return w.op("Shrink", [x], lambd=0.5, bias=0.0 if name == "hardshrink" else 0.5)
    if name == "prelu":
        return w.op("PRelu", [x, w.weight(f"{w.tag}.prelu.{float(prelu.weight[0])!r}", prelu.weight)])
    raise ValueError(f"no ONNX form for activation {name!r}")  # hypernet_file.ACTIVATIONS lists only these


def _module(w: _Writer, x: str, module: Module, key: str, strength: str) -> str:
    """x + strength * f(x), f the module's Sequential."""
    h = x
    for i, (op, layer) in enumerate(module.steps()):
        if op == "linear":  # torch: x W^T + b
            h = w.op("MatMul", [h, w.weight(f"{key}.{i}.weight_t", layer.weight.T)])
            h = w.op("Add", [h, w.weight(f"{key}.{i}.bias", layer.bias)])
        elif op == "act":
            h = _activation(w, h, module.activation, layer)
        else:  # LayerNorm(eps 1e-5, affine), torch's default
            h = w.op("LayerNormalization", [h, w.weight(f"{key}.{i}.ln_weight", layer.weight),
                                            w.weight(f"{key}.{i}.ln_bias", layer.bias)], axis=-1, epsilon=1e-5)
    return w.op("Add", [x, w.op("Mul", [h, strength])])


def bake(model, lora_map: dict, members: list[tuple[Hypernetwork, list[int]]]) -> tuple[dict[str, np.ndarray], list]:
    """Edit `model` (an ONNX ModelProto of the U-Net, weights external) in place with the hypernetworks
    `members` [(file, the widths of it to apply)], in order; returns the new weights {initializer name: array}
    for the caller to store, and [(context, modified context, "k"|"v", width)] per rewired input (tensor
    names: the export's check reads them). Raises ValueError when an attention's to_k / to_v MatMul is
    missing (a graph not exported by sdrt)."""
    from onnx import TensorProto, helper

    w = _Writer("+".join(hn.name for hn, _ in members))
    model.graph.input.extend(helper.make_tensor_value_info(strength_input(i), TensorProto.FLOAT, [])
                             for i in range(len(members)))
    consumers = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            consumers.setdefault(node.input[1], []).append(node)
    done: dict[tuple[str, str, int], str] = {}  # (context, k|v, width) -> its modified tensor: shared by layers
    rewired = []
    for layer in attention_layers(lora_map):
        width = int(lora_map[f"{layer}.to_k"]["shape"][1])  # torch's (out, in): the context's width
        chain = [(i, hn) for i, (hn, widths) in enumerate(members) if width in widths]
        for index, kv in enumerate("kv" if chain else ""):
            matmuls = consumers.get(lora_map[f"{layer}.to_{kv}"]["initializer"], [])
            if len(matmuls) != 1:
                raise ValueError(f"the graph has {len(matmuls)} MatMul nodes for {layer}.to_{kv}, expected 1")
            node = matmuls[0]
            context = node.input[0]
            if (context, kv, width) not in done:
                h = context
                for i, hn in chain:  # A1111's apply_hypernetworks: each member on the previous one's output
                    h = _module(w, h, hn.modules[width][index], f"{hn.name}.{width}.{kv}", strength_input(i))
                done[(context, kv, width)] = h
                rewired.append((context, h, kv, width))
            node.input[0] = done[(context, kv, width)]
    if not rewired:
        raise ValueError(f"no attention of the widths {sorted({x for _, ws in members for x in ws})} in the graph")
    _insert(model, w.nodes, set(w.weights))
    return w.weights, rewired


def _insert(model, nodes, weights: set[str]) -> None:
    """Append the new nodes and restore topological order (each new chain sits before its consumer).
    weights: the new initializers' names (add_weights stores them later)."""
    graph = model.graph
    produced = {i.name for i in graph.input} | {t.name for t in graph.initializer} | weights
    pending = list(graph.node) + list(nodes)
    ordered, ready = [], set(produced)
    while pending:
        rest = []
        for node in pending:
            if all(not i or i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"the graph is not a DAG after baking ({rest[0].name} waits on an input)")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def add_weights(models: list, weights: dict[str, np.ndarray], data_file, location: str) -> None:
    """Write `weights` once into `data_file` and point each model's new initializers at it (`location`,
    relative to the folder the model's external data is resolved in)."""
    from onnx import TensorProto

    places = {}
    with open(data_file, "wb") as f:
        for name, value in weights.items():
            offset = f.tell()
            f.write(value.tobytes())
            places[name] = (offset, value.nbytes, value)
            f.write(b"\0" * (-f.tell() % 64))  # each tensor 64-byte aligned, as onnx's saver does for mmap
    for model in models:
        for name, (offset, length, value) in places.items():
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=value.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            model.graph.initializer.append(t)
