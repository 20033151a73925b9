"""The U-Net's fused-attention graph for ONNX Runtime on the CPU (sdrt/export/passes/cpu_graph.py): the SD1 test bundle
is exported with it (conftest), so every SD1 parity and LoRA test runs through it; these check its shape."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import latents, pixels

import sdrt
from sdrt.errors import InvalidRequest
from sdrt.export import export_bundle
from sdrt.export.passes import cpu_graph, native_graph
from sdrt.runtime import names

QUIET = {"log": lambda *_: None}


def test_every_attention_is_one_operator_and_the_weights_are_shared(models, bundles):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    b = bundles["sd1"]
    manifest = json.loads((b / "sdrt.json").read_text())
    assert manifest["cpu_graphs"] == {"unet": "unet/model.cpu.onnx", "vae_decoder": "vae_decoder/model.cpu.onnx",
                                      "unet-controlnet": "unet/model.controlnet.cpu.onnx"}  # test_controlnet.py
    assert "unet/model.cpu.onnx" in manifest["files"] and "unet (model.cpu.onnx)" in manifest["verification"]["errors"]
    graph = onnx.load(str(b / "unet" / "model.cpu.onnx"), load_external_data=False)
    unet = UNet2DConditionModel.from_pretrained(models["sd1"] / "unet")
    layers = sum(isinstance(m, Attention) for m in unet.modules())
    ops = [n.op_type for n in graph.graph.node]
    native = [n for n in graph.graph.node if n.domain == native_graph.DOMAIN and n.op_type == "Attention"]
    assert len(native) + ops.count("MultiHeadAttention") == layers > 0 and "Softmax" not in ops
    assert native  # head size 8: sdrt's kernel
    assert sorted(f.name for f in graph.functions if f.domain == native_graph.DOMAIN) == \
        ["Attention", "GroupNorm", "GroupNormSiLU"]  # a small model: its group norms are sdrt's kernel too
    assert "InstanceNormalization" not in ops
    assert "unet (model.cpu.onnx), sdrt operators" in manifest["verification"]["errors"]
    # No weight of its own: every sizeable initializer lives in the plain graph's model.onnx_data.
    big = [t for t in graph.graph.initializer if np.prod(t.dims) * 4 > cpu_graph.MAX_UNMATCHED_BYTES]
    assert big and all({e.key: e.value for e in t.external_data}.get("location") == "model.onnx_data" for t in big)
    assert sorted(p.name for p in (b / "unet").iterdir() if "onnx" in p.name) == \
        ["model.controlnet.cpu.onnx", "model.controlnet.onnx", "model.cpu.onnx", "model.onnx", "model.onnx_data"]
    # LoRA overrides go by initializer name: every targetable weight is there under the plain graph's name.
    names = {t.name for t in graph.graph.initializer}
    lora_map = json.loads((b / "unet" / "lora_map.json").read_text())
    assert {entry["initializer"] for entry in lora_map.values()} <= names


@pytest.fixture(scope="module")
def plain_bundle(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "b"
    export_bundle(models["sd1"], out, cpu_graph_policy="never", **QUIET)
    return out


def test_the_vae_decoders_cpu_graph_is_the_plain_one_with_winograd_convolutions(bundles):
    folder = bundles["sd1"] / "vae_decoder"
    assert sorted(p.name for p in folder.iterdir() if "onnx" in p.name) == \
        ["model.cpu.onnx", "model.onnx", "model.onnx_data"]
    plain = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    fast = onnx.load(str(folder / "model.cpu.onnx"), load_external_data=False)
    convs = lambda g: sum(n.op_type == "Conv" and "/wino/" not in n.name for n in g.graph.node)
    rewritten = sum(n.op_type == "ConvTranspose" for n in fast.graph.node)
    assert rewritten > 0 and convs(fast) == convs(plain) - rewritten
    external = [t for t in fast.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx_data"}


def test_the_cpu_backend_opens_it_and_draws_what_the_plain_graph_draws(bundles, plain_bundle):
    fused = sdrt.Pipeline.load(bundles["sd1"])
    assert fused.engines["unet"].path.name == fused.engines["vae_decoder"].path.name == "model.cpu.onnx"
    plain = sdrt.Pipeline.load(plain_bundle)
    assert plain.engines["unet"].path.name == "model.onnx" and plain.manifest.cpu_graphs == {}
    lat = latents(2, seed=3)
    a = pixels(fused.txt2img("a red cube", steps=6, latents=lat, batch=2, guidance=6))
    b = pixels(plain.txt2img("a red cube", steps=6, latents=lat, batch=2, guidance=6))
    assert np.abs(a - b).max() <= 1 / 255


@pytest.mark.parametrize("case", ["large", "mixed"])
def test_where_sdrts_operators_stop_the_graph_keeps_onnx_runtimes_and_draws_the_same(models, plain_bundle, tmp_path,
                                                                                    monkeypatch, case):
    """large: what SD 1.5 and 2.1 get (head sizes 40-160, gigabytes of weights), no sdrt operator at all; mixed:
    attentions over more than 16 x 77 scores (the 8x8 latent level) stay ONNX Runtime's. Simulated on the test
    model by lowering the limits below it."""
    from sdrt.runtime.engines.ort import OrtEngine

    if case == "large":
        monkeypatch.setattr(cpu_graph, "NATIVE_MAX_HEAD_SIZE", 0)
        monkeypatch.setattr(OrtEngine, "SPLIT_MAX_WEIGHT_BYTES", 0)
    else:
        monkeypatch.setattr(cpu_graph, "NATIVE_MAX_SCORES", 16 * 77)
    export_bundle(models["sd1"], tmp_path / "b", cpu_graph_policy="always", **QUIET)
    monkeypatch.undo()
    graph = onnx.load(str(tmp_path / "b" / "unet" / "model.cpu.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    ours = sorted({n.op_type for n in graph.graph.node if n.domain == native_graph.DOMAIN})
    if case == "large":
        assert "MultiHeadAttention" in ops and "InstanceNormalization" in ops and not ours and not graph.functions
    else:
        assert "MultiHeadAttention" in ops and ours == ["Attention", "GroupNorm", "GroupNormSiLU"]
    lat = latents(1, seed=4)
    ours_px = pixels(sdrt.Pipeline.load(tmp_path / "b").txt2img("a red cube", steps=4, latents=lat, guidance=6))
    plain = pixels(sdrt.Pipeline.load(plain_bundle).txt2img("a red cube", steps=4, latents=lat, guidance=6))
    assert np.abs(ours_px - plain).max() <= 1 / 255


def test_a_lora_on_3x3_convolutions_reaches_their_winograd_form(bundles, plain_bundle, tmp_path):
    """A LoCon-style LoRA on resnet convolutions: ONNX Runtime folds Winograd's weight transform from the graph
    file's weight unless told not to (runtime/engines/ort.py); the CPU graph must draw what the plain graph draws."""
    import torch
    from safetensors.torch import save_file

    graph = onnx.load(str(bundles["sd1"] / "unet" / "model.cpu.onnx"), load_external_data=False)
    assert sum(n.op_type == "ConvTranspose" for n in graph.graph.node) >= 4  # Winograd form (conftest)
    g, tensors = torch.Generator().manual_seed(5), {}
    for layer, (c_out, c_in) in {"down_blocks_0_resnets_0_conv1": (32, 32), "up_blocks_1_resnets_0_conv2": (32, 32)}.items():
        key = f"lora_unet_{layer}"
        tensors |= {f"{key}.lora_down.weight": torch.randn((4, c_in, 3, 3), generator=g) * 0.3,
                    f"{key}.lora_up.weight": torch.randn((c_out, 4, 1, 1), generator=g) * 0.3,
                    f"{key}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(tmp_path / "locon.safetensors"))
    lat, lora = latents(1, seed=6), [(tmp_path / "locon.safetensors", 1.0)]
    a = pixels(sdrt.Pipeline.load(bundles["sd1"]).txt2img("a red cube", steps=4, latents=lat, loras=lora))
    b = pixels(sdrt.Pipeline.load(plain_bundle).txt2img("a red cube", steps=4, latents=lat, loras=lora))
    base = pixels(sdrt.Pipeline.load(plain_bundle).txt2img("a red cube", steps=4, latents=lat))
    assert np.abs(a - b).max() <= 1 / 255 and np.abs(b - base).max() > 10 / 255


def test_auto_fuses_every_unet_and_large_vaes_and_bad_policies_are_refused(models, tmp_path):
    unet, vae = names.UNET, names.VAE_DECODER
    assert cpu_graph.wanted("auto", unet, 64, 64) and cpu_graph.wanted("auto", unet, 512, 512)
    assert not cpu_graph.wanted("auto", vae, 64, 64) and not cpu_graph.wanted("auto", vae, 128, 128)
    assert cpu_graph.wanted("auto", vae, 256, 256) and cpu_graph.wanted("auto", vae, 512, 512)
    assert cpu_graph.wanted("always", vae, 64, 64) and not cpu_graph.wanted("never", unet, 768, 768)
    assert not cpu_graph.wanted("always", names.TEXT_ENCODER, 512, 512)
    with pytest.raises(InvalidRequest, match="cpu graph policy 'fast' is not one of auto, always, never"):
        export_bundle(models["sd1"], tmp_path / "x", cpu_graph_policy="fast", **QUIET)
    assert not (tmp_path / "x").exists()


def test_a_graph_that_would_copy_a_weight_is_not_written(tmp_path):
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((256, 256), np.float32), "w")
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                                [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                                initializer=[weight]))
    with pytest.raises(cpu_graph.Unsupported, match="'w' .262144 bytes. has no copy in the plain graph"):
        cpu_graph._share_weights(model, {})


def test_info_names_the_cpu_graph(bundles, capsys):
    from sdrt.cli import main

    with pytest.raises(SystemExit) as done:
        main(["info", str(bundles["sd1"])])
    assert done.value.code in (0, None)
    assert "unet/model.cpu.onnx: the same with fused attention and Winograd convolutions, for ONNX Runtime on the CPU" in capsys.readouterr().out
