"""Hypernetworks (A1111 .pt files) baked into U-Net variants, against diffusers' pipelines with A1111's rule in
every attention (tests/hypernet_files.py's ReferenceProcessor, on the torch modules the files were written from).

The test models' text width (SD1-style 48, SD2-style 40) differs from their attention widths (32, 64), as
768 / 1024 differ from 320 / 640 / 1280 in the released models, so the text module is told apart.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import latents, pixels
from hypernet_files import TEXT_WIDTHS, with_processor, write_a1111
from test_cli import run
from test_lora import reference_with_lora, write_lora
from test_modes import VAE_MODULE, Draws, photo
from test_parity import reference_images, use_scheduler

import sdrt
from sdrt.errors import InvalidRequest

TOLERANCE = 2 / 255
TEXT = TEXT_WIDTHS  # the `hn` fixture (conftest.py) builds one model of each family at these text widths


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("strength", [0.0, 0.7, 1.0])
def test_images_match_diffusers_with_a1111s_rule(hn, family, strength):
    h = hn[family]
    lat, prompt = latents(2, seed=5), "a red circle on a blue background"
    got = pixels(h["pipe"].txt2img(f"{prompt} <hypernet:{h['name']}:{strength}>", steps=8, latents=lat, batch=2))
    with with_processor(h["ref"].unet, h["modules"], strength):
        want = reference_images(h["ref"], "euler", prompt, "", 7.5, lat, 8)
    assert np.abs(got - want).max() <= TOLERANCE
    if strength == 1.0:  # the hypernetwork changes the image visibly
        plain = pixels(h["pipe"].txt2img(prompt, steps=8, latents=lat, batch=2))
        assert np.abs(got - plain).mean() > 0.02


def test_strength_zero_is_the_plain_unet_exactly_and_the_png_carries_the_tag(hn):
    h = hn["sd1"]
    plain = h["pipe"].txt2img("a cat", steps=4, seed=3)[0]
    zero = h["pipe"].txt2img(f"a cat <hypernet:{h['name']}:0>", steps=4, seed=3)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(zero))
    tagged = h["pipe"].txt2img(f"a cat <hypernet:{h['name']}:0.8>", steps=4, seed=3)[0]
    option = h["pipe"].txt2img("a cat", hypernetwork=(h["name"], 0.8), steps=4, seed=3)[0]
    named = h["pipe"].txt2img("a cat", hypernetwork=f"{h['name']}:0.8", steps=4, seed=3)[0]
    assert np.array_equal(np.asarray(tagged), np.asarray(option)) and np.array_equal(np.asarray(option),
                                                                                     np.asarray(named))
    assert option.info["parameters"].splitlines()[0] == f"a cat <hypernet:{h['name']}:0.8>"
    both = h["pipe"].txt2img(f"a cat <hypernet:{h['name']}:0.8>", hypernetwork=h["name"], steps=4, seed=3)[0]
    assert np.array_equal(np.asarray(both), np.asarray(tagged))  # the prompt's own tag wins, as in A1111
    default = h["pipe"].txt2img(f"a cat <hypernet:{h['name']}>", steps=4, seed=3)[0]
    one = h["pipe"].txt2img(f"a cat <hypernet:{h['name']}:1>", steps=4, seed=3)[0]
    assert np.array_equal(np.asarray(default), np.asarray(one))  # A1111's default strength: 1


def test_works_with_lora(hn, tmp_path):
    h = hn["sd1"]
    path = tmp_path / "shiny.safetensors"
    te_deltas = write_lora(path, h["ref"].unet, h["ref"].text_encoder, "kohya", seed=4)
    lat, prompt = latents(1, seed=6), "a green triangle"
    got = pixels(h["pipe"].txt2img(prompt, steps=6, latents=lat, loras=[(path, 0.8)], hypernetwork=h["name"]))
    with with_processor(h["ref"].unet, h["modules"], 1.0):
        want = reference_with_lora(h["ref"], path, te_deltas, 0.8, prompt=prompt, latents=torch.from_numpy(lat))
    assert np.abs(got - (want * 255).round() / 255).max() <= TOLERANCE
    h["pipe"].set_loras([])


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
def test_other_samplers_match_diffusers(hn, sampler):
    h = hn["sd2"]
    lat = latents(1, seed=2)
    got = pixels(h["pipe"].txt2img("a house", steps=6, sampler=sampler, latents=lat, hypernetwork=(h["name"], 0.7)))
    with with_processor(h["ref"].unet, h["modules"], 0.7):
        want = reference_images(h["ref"], sampler, "a house", "", 7.5, lat, 6)
    assert np.abs(got - want).max() <= TOLERANCE


def test_img2img_matches_diffusers(monkeypatch, hn):
    from diffusers import StableDiffusionImg2ImgPipeline

    h = hn["sd1"]
    draws = Draws(monkeypatch)
    got = pixels(h["pipe"].img2img(photo(), f"a red circle <hypernet:{h['name']}:0.7>", strength=0.7, steps=8,
                                   seed=4))
    ref = StableDiffusionImg2ImgPipeline(**h["ref"].components)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, "euler")
    draws.replay({VAE_MODULE: [0], "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img": [1]})
    with with_processor(ref.unet, h["modules"], 0.7):
        want = ref("a red circle", image=photo(), strength=0.7, num_inference_steps=8, output_type="np").images
    assert np.abs(got - (want * 255).round() / 255).max() <= TOLERANCE
    assert h["pipe"].inpaint(photo(), photo().convert("L"), "x <hypernet:%s:0.5>" % h["name"], steps=2, seed=1)


# Every activation A1111 names or adds by name, each with its own structure (layer norm, dropout gaps,
# activate_output both ways); checked at the U-Net: sdrt's variant graph against diffusers' U-Net + the rule.
ACTIVATION_CASES = [
    ("linear", {}), ("relu", {"layer_norm": True}), ("leakyrelu", {"activate_output": True}),
    ("elu", {"dropout_structure": (0, 0.1, 0.1, 0), "layer_structure": (1, 2, 2, 1)}), ("swish", {}),
    ("tanh", {"layer_norm": True, "activate_output": True}), ("sigmoid", {}), ("gelu", {"layer_norm": True}),
    ("silu", {}), ("mish", {}), ("softsign", {}), ("softplus", {}), ("selu", {}), ("celu", {}), ("relu6", {}),
    ("hardtanh", {}), ("hardsigmoid", {"activate_output": True}), ("hardswish", {}), ("prelu", {}),
    ("logsigmoid", {}), ("tanhshrink", {}), ("hardshrink", {}), ("softshrink", {}), ("rrelu", {}),
    ("relu", {"activate_output": None}),  # no activate_output key: A1111 reads True
    ("linear", {"legacy": True}),  # the first format: linear1 / linear2
    ("relu", {"text_only": True}),  # a text-only file (768 only, in a released SD 1.x)
]


@pytest.fixture(scope="module")
def sweep(hn, tmp_path_factory):
    """A copy of the SD2 bundle for the activation sweep (each case adds a variant)."""
    bundle = tmp_path_factory.mktemp("sweep") / "bundle"
    shutil.copytree(hn["sd2"]["bundle"], bundle)
    return bundle


@pytest.mark.parametrize("activation,options", ACTIVATION_CASES,
                         ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o in ACTIVATION_CASES])
def test_every_activation_and_structure_matches_torch(hn, sweep, tmp_path, activation, options):
    from sdrt.export import add_hypernetwork
    from sdrt.runtime import names
    from sdrt.runtime.engines import OrtEngine

    options = dict(options)
    widths = [TEXT["sd2"]] if options.pop("text_only", False) else [32, TEXT["sd2"], 64]
    name = f"{activation}_{len(list(sweep.glob('unet/hypernet/*.onnx')))}"
    file = tmp_path / f"{name}.pt"
    modules = write_a1111(file, widths, activation=activation, std=0.8, seed=3, **options)
    add_hypernetwork(sweep, file, allow_pickle=True, log=lambda *_: None)
    entry = json.loads((sweep / "sdrt.json").read_text())["hypernetworks"][name]
    assert entry["widths"] == widths and entry["file"] == file.name
    unet = hn["sd2"]["ref"].unet
    rng = np.random.default_rng(0)
    feeds = {names.SAMPLE: rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             names.TIMESTEP: np.array([500.0, 20.0], np.float32),
             names.ENCODER_HIDDEN_STATES: rng.standard_normal((2, 77, TEXT["sd2"]), dtype=np.float32)}
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        plain = unet(t[names.SAMPLE], t[names.TIMESTEP], encoder_hidden_states=t[names.ENCODER_HIDDEN_STATES]).sample
        with with_processor(unet, modules, 0.9):
            want = unet(t[names.SAMPLE], t[names.TIMESTEP], encoder_hidden_states=t[names.ENCODER_HIDDEN_STATES]).sample
    want, plain = want.numpy(), plain.numpy()
    assert np.linalg.norm(want - plain) / np.linalg.norm(plain) > 1e-3, "the file should change the U-Net"
    for graph in ("onnx", "cpu.onnx"):
        engine = OrtEngine(sweep / f"unet/hypernet/{name}.{graph}", "variant", data_dir=sweep / "unet")
        got = engine(**feeds, **{names.HYPERNETWORK_STRENGTH: np.float32(0.9)})[names.OUT_SAMPLE]
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-4, f"{graph}: relative error {err:.2e}"


def test_tensorrt_side_specs_digests_and_the_graph_its_parser_reads(hn, tmp_path):
    """What `sdrt build --hypernetwork NAME` builds from, on the CPU: the engine specs (the U-Net's shapes and a
    scalar strength), the files its identity covers, and the graph TensorRT parses (weights gathered beside
    it, fp32 and fp16) run by ONNX Runtime against the bundle's variant."""
    from sdrt.export.passes.fp16 import convert_file
    from sdrt.runtime import names
    from sdrt.runtime.engines import OrtEngine
    from sdrt.runtime.engines.store import onnx_digests
    from sdrt.runtime.engines.trt_profiles import engine_specs
    from sdrt.runtime.manifest import load_manifest

    h = hn["sd2"]
    m = load_manifest(h["bundle"])
    comp = names.hypernet_component(h["name"])
    specs = {s.component: s for s in engine_specs(m, [64], batch=2, hypernetworks=[h["name"]])}
    assert specs[comp].key == f"{comp}-64x64-b4-t77-fp16"
    assert specs[comp].input_shapes == {**specs[names.UNET].input_shapes, names.HYPERNETWORK_STRENGTH: ()}
    with pytest.raises(InvalidRequest, match="hypernetwork 'nope' is not in this bundle"):
        engine_specs(m, [64], hypernetworks=["nope"])
    assert not any("hypernet/" in rel for rel in onnx_digests(m, names.UNET))  # adding one keeps U-Net engines
    assert set(onnx_digests(m, comp)) == set(onnx_digests(m, names.UNET)) | {
        f"unet/hypernet/{h['name']}.{ext}" for ext in ("onnx", "cpu.onnx", "onnx_data")}
    rng = np.random.default_rng(1)
    feeds = {names.SAMPLE: rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             names.TIMESTEP: np.array([700.0, 300.0], np.float32),
             names.ENCODER_HIDDEN_STATES: rng.standard_normal((2, 77, TEXT["sd2"]), dtype=np.float32),
             names.HYPERNETWORK_STRENGTH: np.float32(0.8)}
    src = h["bundle"] / f"unet/hypernet/{h['name']}.onnx"
    want = OrtEngine(src, comp, data_dir=h["bundle"] / "unet")(**feeds)[names.OUT_SAMPLE]
    for fp16, limit in ((False, 1e-6), (True, 1e-2)):
        out = convert_file(src, tmp_path / str(fp16), h["bundle"] / "unet", fp16)
        got = OrtEngine(out, comp)(**feeds)[names.OUT_SAMPLE]  # its weights beside it, as the parser reads them
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < limit, fp16


@pytest.mark.parametrize("options,keys", [  # the reference note's table of A1111's Sequential numbering
    (dict(activation="linear"), ["linear.0", "linear.1"]),
    (dict(activation="relu", activate_output=False), ["linear.0", "linear.2"]),
    (dict(activation="relu", activate_output=True), ["linear.0", "linear.2"]),
    (dict(activation="swish", layer_norm=True, activate_output=False), ["linear.0", "linear.2", "linear.3", "linear.4"]),
    (dict(activation="relu", dropout_structure=(0, 0.3, 0), activate_output=False), ["linear.0", "linear.3"]),
])
def test_a1111_numbering_is_read_at_the_released_widths(tmp_path, options, keys):
    """Files at SD's real widths (small hidden layers: layer_structure 1, 0.1, 1): the numbering A1111 writes,
    an SD 1.x file with the 1024 module A1111's UI can add, and a text-only 768 file, against each family."""
    from sdrt.export.hypernet_file import check_widths, read_hypernetwork

    file = tmp_path / "real.pt"
    write_a1111(file, [320, 640, 768, 1024, 1280], layer_structure=(1, 0.1, 1), **options)
    state = torch.load(file, weights_only=True)
    assert sorted({k.rsplit(".", 1)[0] for k in state[768][0]}) == keys
    hn = read_hypernetwork(file, allow_pickle=True)
    sd1, sd2 = ({320, 640, 1280}, 768), ({320, 640, 1280}, 1024)
    assert check_widths(hn, *sd1) == [320, 640, 768, 1280]  # 1024 skipped on SD 1.x, as A1111 does
    assert check_widths(hn, *sd2) == [320, 640, 1024, 1280]
    write_a1111(tmp_path / "text.pt", [768], layer_structure=(1, 0.1, 1), **options)
    text_only = read_hypernetwork(tmp_path / "text.pt", allow_pickle=True)
    assert check_widths(text_only, *sd1) == [768]
    with pytest.raises(InvalidRequest, match=r"widths \[768\].*text width 1024: it was made for another model family"):
        check_widths(text_only, *sd2)
    steps = [op for op, _ in text_only.modules[768][0].steps()]
    act = options["activation"] != "linear"
    assert steps == ["linear"] + ["act"] * act + ["ln"] * bool(options.get("layer_norm")) + ["linear"] + \
        ["act"] * (act and bool(options.get("activate_output"))) + ["ln"] * bool(options.get("layer_norm"))


@pytest.fixture(scope="module")
def stacked(hn, tmp_path_factory):
    """The SD1 bundle with a stack of two files (A1111's several tags)."""
    from sdrt.export import add_stack

    root = tmp_path_factory.mktemp("stack")
    bundle = root / "bundle"
    shutil.copytree(hn["sd1"]["bundle"], bundle)
    second = root / "ink.pt"
    modules = write_a1111(second, [32, 48], activation="tanh", layer_norm=True, seed=8)
    assert add_stack(bundle, [hn["sd1"]["file"], second], allow_pickle=True, log=lambda *_: None) == "sd1_style+ink"
    return dict(bundle=bundle, pipe=sdrt.Pipeline.load(bundle), first=hn["sd1"]["modules"], second=modules,
                files=[hn["sd1"]["file"], second])


@pytest.mark.parametrize("strengths", [(1.0, 0.7), (0.0, 0.8), (0.6, 0.0)])
def test_a_stack_applies_its_files_in_order_as_a1111(hn, stacked, strengths):
    lat, prompt = latents(1, seed=12), "a yellow star"
    a, b = strengths
    got = pixels(stacked["pipe"].txt2img(f"{prompt} <hypernet:sd1_style:{a}> <hypernet:ink:{b}>", steps=6,
                                         latents=lat))
    with with_processor(hn["sd1"]["ref"].unet, stacked["first"], a, then=[(stacked["second"], b)]):
        want = reference_images(hn["sd1"]["ref"], "euler", prompt, "", 7.5, lat, 6)
    assert np.abs(got - want).max() <= TOLERANCE
    if strengths == (1.0, 0.7):  # the second file changes the image visibly, and order matters
        first_only = pixels(stacked["pipe"].txt2img(f"{prompt} <hypernet:sd1_style:1>", steps=6, latents=lat))
        assert np.abs(got - first_only).mean() > 0.01
        with with_processor(hn["sd1"]["ref"].unet, stacked["second"], b, then=[(stacked["first"], a)]):
            swapped = reference_images(hn["sd1"]["ref"], "euler", prompt, "", 7.5, lat, 6)
        assert np.abs(swapped - want).mean() > 1e-3
    plain = pixels(stacked["pipe"].txt2img(prompt, steps=6, latents=lat))
    off = pixels(stacked["pipe"].txt2img(f"{prompt} <hypernet:sd1_style:0> <hypernet:ink:0>", steps=6, latents=lat))
    assert np.array_equal(plain, off)


def test_a_stack_is_listed_built_and_removed_as_one(stacked, tmp_path, capsys):
    from sdrt.runtime import names
    from sdrt.runtime.engines.trt_profiles import engine_specs
    from sdrt.runtime.manifest import load_manifest

    with pytest.raises(InvalidRequest, match="the prompt asks for several hypernetworks, <hypernet:ink:1> and "
                                             "<hypernet:sd1_style:1>; A1111 applies them one after the other"):
        stacked["pipe"].txt2img("x <hypernet:ink> <hypernet:sd1_style>", steps=1)  # the other order: not baked
    m = load_manifest(stacked["bundle"])
    comp = names.hypernet_component("sd1_style+ink")
    assert [f["file"] for f in m.hypernetworks["sd1_style+ink"]["stack"]] == ["sd1_style.pt", "ink.pt"]
    spec = next(s for s in engine_specs(m, [64], hypernetworks=["sd1_style+ink"]) if s.component == comp)
    assert spec.input_shapes[names.HYPERNETWORK_STRENGTH] == spec.input_shapes[names.HYPERNETWORK_STRENGTH + "_1"] == ()
    code, out, _ = run(capsys, "info", stacked["bundle"])
    assert "hypernetwork sd1_style+ink: a stack of sd1_style.pt" in out and "<hypernet:sd1_style:1> <hypernet:ink:1>" in out
    copy = tmp_path / "bundle"
    shutil.copytree(stacked["bundle"], copy)
    code, _, err = run(capsys, "hypernetwork", "remove", copy, "sd1_style+ink")
    assert code == 0, err
    assert set(sdrt.Pipeline.load(copy).manifest.hypernetworks) == {"sd1_style"}
    code, out, err = run(capsys, "hypernetwork", "add", copy, *stacked["files"], "--allow-pickle", "--stack")
    assert code == 0 and "added hypernetwork 'sd1_style+ink'" in out and "<hypernet:sd1_style:1> <hypernet:ink:1>" in out
    assert load_manifest(copy).hypernetworks["sd1_style+ink"] == m.hypernetworks["sd1_style+ink"]
