"""The opt-in int8 U-Net (sdrt/export/passes/int8.py): exported on request, checked against torch with its own limit,
opened only when asked for, close to the fp32 images, and refused where it can't work."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SD1_CPU_GRAPH, latents, pixels

import sdrt
from sdrt.errors import InvalidRequest
from sdrt.export import export_bundle
from sdrt.export.passes.int8 import INT8_ERROR_LIMIT, WEIGHT_RANGE


@pytest.fixture(scope="module")
def int8_bundle(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "b"
    export_bundle(models["sd1"], out, **SD1_CPU_GRAPH, int8=True, log=lambda *_: None)
    return out


def test_the_int8_graph_is_exported_checked_and_hashed(int8_bundle):
    import onnx

    m = json.loads((int8_bundle / "sdrt.json").read_text())
    assert m["int8_graphs"] == {"unet": "unet/model.int8.onnx"} and "unet/model.int8.onnx" in m["files"]
    assert 1e-6 < m["verification"]["errors"]["unet (model.int8.onnx)"] <= INT8_ERROR_LIMIT  # int8, truly
    ops = {n.op_type for n in onnx.load(str(int8_bundle / "unet" / "model.int8.onnx"),
                                        load_external_data=False).graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    assert ops & {"MultiHeadAttention", "Attention"}  # quantized from the fused-attention graph


def test_int8_weights_fit_every_x86_kernel(int8_bundle):
    """7-bit weights: an AVX2 kernel's 16-bit sum of two u8 x s8 products (2 * 255 * 64 < 2^15) can't saturate,
    so the graph is as accurate on a CPU without VNNI as on one with it (tests/../.ci/emulated-avx2 runs this
    file on such a CPU)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8_bundle / "unet" / "model.int8.onnx"))
    init = {t.name: t for t in model.graph.initializer}
    weights = [numpy_helper.to_array(init[n.input[1]]) for n in model.graph.node
               if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and n.input[1] in init]
    assert len(weights) >= 10
    lo, hi = WEIGHT_RANGE
    for w in weights:
        assert w.dtype == np.int8 and lo <= int(w.min()) and int(w.max()) <= hi
        assert 2 * 255 * max(-int(w.min()), int(w.max())) < 2**15
    assert any(int(w.min()) == lo or int(w.max()) == hi for w in weights)  # the range is used, not shrunk


def test_int8_is_opened_only_when_asked_and_stays_close_to_fp32(int8_bundle):
    plain, quantized = sdrt.Pipeline.load(int8_bundle), sdrt.Pipeline.load(int8_bundle, int8=True)
    assert plain.engines["unet"].path.name == "model.cpu.onnx"
    assert quantized.engines["unet"].path.name == "model.int8.onnx" and quantized.int8
    lat = latents(1, seed=5)
    a = pixels(plain.txt2img("a red cube", steps=6, latents=lat))
    b = pixels(quantized.txt2img("a red cube", steps=6, latents=lat))
    assert not np.array_equal(a, b)
    psnr = 10 * np.log10(1.0 / np.mean((a - b) ** 2))
    assert psnr >= 30, psnr


def test_int8_refusals(int8_bundle, bundles, tmp_path):
    with pytest.raises(InvalidRequest, match="has no int8 U-Net; export it with `sdrt export SRC --out BUNDLE --int8`"):
        sdrt.Pipeline.load(bundles["sd1"], int8=True)
    with pytest.raises(InvalidRequest, match="int8 is an ONNX Runtime CPU mode"):
        sdrt.Pipeline.load(int8_bundle, int8=True, backend="tensorrt")
    pipe = sdrt.Pipeline.load(int8_bundle, int8=True)
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")  # refused before the file is read
    with pytest.raises(InvalidRequest, match="LoRA can't patch the int8 U-Net"):
        pipe.set_loras([(lora, 1.0)])


def test_cli_export_and_generate_with_int8(models, int8_bundle, tmp_path, capsys):
    from sdrt.cli import main

    def run(*argv):
        with pytest.raises(SystemExit) as done:
            main([str(a) for a in argv])
        return done.value.code or 0, capsys.readouterr()

    code, out = run("generate", "a cat", "--model", int8_bundle, "--int8", "--steps", "2", "--out", tmp_path / "a.png")
    assert code == 0 and (tmp_path / "a.png").is_file(), out.err
    code, out = run("generate", "a cat", "--int8", "--steps", "2", "--out", tmp_path / "b.png")  # embedded: no int8
    assert code == 2 and "has no int8 U-Net" in out.err and out.err.count("\n") == 1
    assert not (tmp_path / "b.png").exists()
    code, out = run("info", int8_bundle)
    assert "unet/model.int8.onnx: the same with int8 MatMuls (--int8)" in out.out
