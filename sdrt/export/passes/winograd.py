"""Winograd F(4x4, 3x3) for large 3x3 convolutions, in the ONNX Runtime CPU graphs (U-Net, VAE decoder).

Reference: Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016), F(4x4, 3x3) with
interpolation points 0, 1, -1, 2, -2 and infinity; the matrices below are theirs.

Why: at 512x512 the U-Net's 3x3 convolutions are over 40 % of a step on the CPU, and ONNX Runtime already runs
them near this CPU's fp32 peak. F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input tile with 36
multiplications per (input, output) channel pair instead of 144: the GEMMs shrink 4x, paid for by transforms
that read and write the activations a few more times. That trade wins where there are many channels per
pixel (the GEMMs' depth) and many tiles (their width), hence `RULES`. Rounding differs from a direct convolution
by about 1e-5 relative.

How, as plain ONNX operators (the weight transform is a constant subgraph of the original weight: ONNX Runtime
folds it once, at load, and the graph keeps the weight's name for LoRA; runtime/engines/ort.py turns that folding off
under a LoRA on a 3x3 convolution, which ONNX Runtime would miss), each eligible Conv(x, w, b) with x
(B, C, H, W) becomes
    V = depthwise Conv(x, B^T d B kernels, stride 4)     (B, 36*C, n, m)   n, m = ceil(H/4), ceil(W/4)
    V = V as (36, B, C, n*m)
    M = U @ V,  U = G w G^T as (36, 1, CO, C)          (36, B, CO, n*m)
    Y = depthwise ConvTranspose(M as (B, 36*CO, n, m), A^T m A kernels, stride 4) + b   (B, CO, 4n, 4m)
    y = Y[:, :, :H, :W]
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

# Which convolutions: (smallest feature-map side at the bundle's default size, fewest input channels).
# "auto" from measurements (benchmarks/NOTES.md, section 7; benchmarks/winograd_conv.py, Winograd / direct):
# 320 channels at 64x64 0.51, 512 at 128x128 0.61, 256 at 256x256 0.63, 128 at 512x512 1.42; SD 1.5's 16x16
# level (1280 channels) gains the whole U-Net 5 % for 15 GB of peak memory while loading. "all": every 3x3
# convolution the rewrite can take (the tests' tiny models), but never conv_in's 4 latent channels.
RULES = {"auto": (32, 256), "all": (1, 16)}
MARK = "/wino/"  # in the name of every node this pass writes

G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]])
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]])
IN_KERNELS = np.einsum("kr,lc->klrc", BT, BT).reshape(36, 1, 6, 6).astype(np.float32)  # V_kl = BT d B
OUT_KERNELS = np.einsum("ik,jl->klij", AT, AT).reshape(36, 1, 4, 4).astype(np.float32)  # y_ij = AT m A


@contextmanager
def recording_conv_sizes(module):
    """Within: module's forward passes record weight name -> (H, W) of each Conv2d's input (the first seen). The
    exporter wraps its check against torch at the bundle's default size in this, so no extra pass is needed."""
    import torch

    sizes, hooks = {}, []

    def record(key):
        def hook(mod, args):  # returns None: the call's arguments stay as they are
            sizes.setdefault(key, tuple(args[0].shape[-2:]))
        return hook

    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Conv2d):
            hooks.append(sub.register_forward_pre_hook(record(f"{name}.weight")))
    try:
        yield sizes
    finally:
        for hook in hooks:
            hook.remove()


def _eligible(node, shapes: dict[str, tuple], sizes: dict[str, tuple[int, int]], rule: tuple[int, int]) -> bool:
    attrs = {a.name: (list(a.ints) or a.i) for a in node.attribute}
    weight = node.input[1] if len(node.input) > 1 else ""
    shape = shapes.get(weight)
    return (node.op_type == "Conv" and shape is not None and len(shape) == 4 and tuple(shape[2:]) == (3, 3)
            and shape[1] >= rule[1] and attrs.get("group", 1) == 1
            and attrs.get("strides", [1, 1]) == [1, 1] and attrs.get("dilations", [1, 1]) == [1, 1]
            and attrs.get("pads", [0] * 4) == [1, 1, 1, 1] and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", 0)
            and weight in sizes and min(sizes[weight]) >= rule[0])


def rewrite(model, sizes: dict[str, tuple[int, int]], rule: str = "auto") -> int:
    """Replace the eligible Conv nodes of model (an onnx ModelProto, opset >= 15) in place; returns how many.
    sizes: recording_conv_sizes() at the bundle's default size; rule: a key of RULES."""
    from onnx import numpy_helper

    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    consts = {"wino/G": G.astype(np.float32), "wino/GT": G.T.astype(np.float32).copy(),
              "wino/in": IN_KERNELS, "wino/out": OUT_KERNELS, "wino/spatial": np.array([2, 3], np.int64),
              "wino/zeros2": np.zeros(2, np.int64)}
    new_nodes, count = [], 0
    for node in model.graph.node:
        if _eligible(node, shapes, sizes, RULES[rule]):
            nodes, node_consts = _replacement(node, *shapes[node.input[1]][:2])
            new_nodes += nodes
            consts |= node_consts
            count += 1
        else:
            new_nodes.append(node)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    return count


def _replacement(node, co: int, c: int) -> tuple[list, dict[str, np.ndarray]]:
    """The nodes (and their small int64 constants) that compute Conv node (weight (co, c, 3, 3)) by Winograd."""
    from onnx import helper

    x, w, *bias = node.input
    p = f"{node.name or node.output[0]}{MARK.rstrip('/')}"
    consts = {f"{p}/{k}": np.array(v, np.int64) for k, v in {
        "u_shape": [36, 1, co, c], "v_shape": [0, c, 36, -1], "in_reps": [c, 1, 1, 1], "out_reps": [co, 1, 1, 1],
        "m_chan": [0, co * 36]}.items()}
    nodes = []

    def n(op: str, ins: list[str], out: str, **attrs) -> str:  # add a node named like its output; return that
        nodes.append(helper.make_node(op, ins, [f"{p}/{out}"], name=f"{p}/{out}", **attrs))
        return f"{p}/{out}"

    # U = G w G^T: (CO, C, 3, 3) -> (36, 1, CO, C); constant, folded by ONNX Runtime when the session loads
    u = n("MatMul", [n("MatMul", ["wino/G", w], "gw"), "wino/GT"], "gwg")  # (CO, C, 6, 6)
    u = n("Reshape", [n("Transpose", [u], "gwg_t", perm=[2, 3, 0, 1]), f"{p}/u_shape"], "u")
    # V: every 6x6 tile at stride 4, transformed by one depthwise conv; end padding 4 covers any H, W
    kin = n("Tile", ["wino/in", f"{p}/in_reps"], "kin")  # (36*C, 1, 6, 6), channel c*36 + k
    v = n("Conv", [x, kin], "v_tiles", group=c, kernel_shape=[6, 6], strides=[4, 4], pads=[1, 1, 4, 4])
    tiles = n("Shape", [v], "tiles", start=2)  # [n, m]
    v = n("Transpose", [n("Reshape", [v, f"{p}/v_shape"], "v_flat")], "v", perm=[2, 0, 1, 3])  # (36, B, C, nm)
    m = n("Transpose", [n("MatMul", [u, v], "m")], "m_t", perm=[1, 2, 0, 3])  # (B, CO, 36, nm)
    m = n("Reshape", [m, n("Concat", [f"{p}/m_chan", tiles], "m_shape", axis=0)], "m_tiles")  # (B, 36*CO, n, m)
    kout = n("Tile", ["wino/out", f"{p}/out_reps"], "kout")  # (36*CO, 1, 4, 4)
    y = n("ConvTranspose", [m, kout, *bias], "y_tiles", group=co, kernel_shape=[4, 4], strides=[4, 4])
    hw = n("Shape", [x], "hw", start=2)
    nodes.append(helper.make_node("Slice", [y, "wino/zeros2", hw, "wino/spatial"], list(node.output),
                                  name=f"{p}/crop"))  # (B, CO, H, W)
    return nodes, consts


def convolutions(model, ctx):
    """The pass (a PassContext): `rewrite` at the bundle's default size, by the export's rule."""
    ctx.counts["winograd"] = rewrite(model, ctx.conv_sizes, ctx.winograd_rule)
    return model
