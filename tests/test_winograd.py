"""Winograd F(4x4, 3x3) convolutions (sdrt/export/passes/winograd.py) against ONNX Runtime's direct Conv: any
feature-map size, the bias, overrides of the weight (LoRA) reaching the folded transform, and the nodes it leaves
alone. The SD1 test bundle's CPU graph has every eligible convolution in this form (conftest), so the parity, LoRA
and int8 tests run through it too."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.export.passes import winograd
from sdrt.runtime.engines.ort import OrtEngine

RNG = np.random.default_rng(7)


def conv_model(c_in: int, c_out: int, kernel: int = 3, **attrs):
    w = (RNG.standard_normal((c_out, c_in, kernel, kernel)) / np.sqrt(9 * c_in)).astype(np.float32)
    b = RNG.standard_normal(c_out).astype(np.float32)
    attrs = {"pads": [1, 1, 1, 1], **attrs}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "m.conv.weight", "m.conv.bias"], ["y"], name="/m/conv/Conv", **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c_in, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "m.conv.weight"), numpy_helper.from_array(b, "m.conv.bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, tmp_path, name: str, x: np.ndarray, overrides=None) -> np.ndarray:
    path = tmp_path / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return OrtEngine(path, name, threads=1, overrides=overrides)(x=x)["y"]


@pytest.mark.parametrize("h,w", [(8, 8), (5, 7), (1, 1), (4, 13), (12, 6)])
def test_it_matches_the_direct_convolution_at_any_size(tmp_path, h, w):
    direct = conv_model(24, 40)
    fast = onnx.ModelProto.FromString(direct.SerializeToString())
    assert winograd.rewrite(fast, {"m.conv.weight": (h, w)}, rule="all") == 1
    ops = [n.op_type for n in fast.graph.node]
    assert "Conv" in ops and ops.count("MatMul") == 3 and "ConvTranspose" in ops  # the depthwise transforms
    x = RNG.standard_normal((2, 24, h, w)).astype(np.float32)
    want, got = run(direct, tmp_path, "direct", x), run(fast, tmp_path, "fast", x)
    assert got.shape == want.shape == (2, 40, h, w)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_weight_override_reaches_the_folded_transform(tmp_path):
    direct = conv_model(16, 16)
    fast = onnx.ModelProto.FromString(direct.SerializeToString())
    winograd.rewrite(fast, {"m.conv.weight": (16, 16)}, rule="all")
    patched = {"m.conv.weight": RNG.standard_normal((16, 16, 3, 3)).astype(np.float32)}
    x = RNG.standard_normal((1, 16, 16, 16)).astype(np.float32)
    want = run(direct, tmp_path, "direct", x, patched)
    got = run(fast, tmp_path, "fast", x, patched)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(got - run(fast, tmp_path, "fast", x)).max() > 0.1  # the override did change the output


@pytest.mark.parametrize("why,model,side,rule", [
    ("feature map below auto's 32x32", conv_model(320, 16), (16, 16), "auto"),
    ("fewer than auto's 256 input channels", conv_model(128, 16), (64, 64), "auto"),
    ("strided", conv_model(16, 16, strides=[2, 2]), (64, 64), "all"),
    ("1x1 kernel", conv_model(16, 16, kernel=1, pads=[0, 0, 0, 0]), (64, 64), "all"),
    ("grouped", conv_model(32, 16, group=2), (64, 64), "all"),
    ("4 input channels (conv_in)", conv_model(4, 16), (64, 64), "all"),
    ("size unknown", conv_model(16, 16), None, "all"),
])
def test_other_convolutions_are_left_alone(why, model, side, rule):
    sizes = {} if side is None else {"m.conv.weight": side}
    assert winograd.rewrite(model, sizes, rule) == 0, why
    assert [n.op_type for n in model.graph.node] == ["Conv"]


def test_auto_takes_many_channels_on_large_maps():
    assert winograd.rewrite(conv_model(320, 16), {"m.conv.weight": (32, 32)}) == 1


def test_the_tables_are_lavins_f4x4_3x3():
    """A^T [(G g G^T) * (B^T d B)] A is the valid 3x3 correlation of a 6x6 tile d with g."""
    g, d = RNG.standard_normal((3, 3)), RNG.standard_normal((6, 6))
    want = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(4)] for i in range(4)])
    got = winograd.AT @ ((winograd.G @ g @ winograd.G.T) * (winograd.BT @ d @ winograd.BT.T)) @ winograd.AT.T
    assert np.allclose(got, want, atol=1e-12)
