"""ControlNet against diffusers' StableDiffusionControlNetPipeline: the same tiny random U-Net and ControlNets
(controlnet_models.py), the same latents and control images. Pass bar: 2/255, as test_parity.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import latents, pixels
from controlnet_models import build_controlnet, write_single_file
from PIL import Image
from test_parity import use_scheduler

import sdrt
from sdrt.errors import BundleCorrupt, InvalidRequest, PickleRefused
from sdrt.runtime import names

TOLERANCE = 2 / 255
QUIET = {"log": lambda *_: None}
PROMPT = "a red circle on a blue background"


def control_image(seed: int, size: int = 64) -> Image.Image:
    """Blocky shapes, as an edge or depth map has (more structure than noise)."""
    rng = np.random.default_rng(seed)
    small = (rng.uniform(0, 1, (size // 8, size // 8, 3)) > 0.5).astype(np.uint8) * 255
    return Image.fromarray(small).resize((size, size), Image.NEAREST)


@pytest.fixture(scope="module")
def cn(models, tmp_path_factory):
    """Per family: ControlNet folders (two for SD1), their bundles, and diffusers' ControlNet pipelines."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from sdrt.export import export_controlnet

    root = tmp_path_factory.mktemp("controlnet")
    out = {}
    for fam, seeds in (("sd1", (3, 4)), ("sd2", (5,))):
        folders = [build_controlnet(models[fam], root / f"{fam}-cn{k}", seed=s) for k, s in enumerate(seeds)]
        bundles = [root / f"{fam}-cnb{k}" for k in range(len(seeds))]
        for folder, bundle in zip(folders, bundles):
            export_controlnet(folder, bundle, height=64, width=64, **QUIET)
        base = StableDiffusionPipeline.from_pretrained(models[fam], safety_checker=None, requires_safety_checker=False)
        refs = {}
        for key, nets in (("one", folders[:1]), ("two", folders)):
            loaded = [ControlNetModel.from_pretrained(f) for f in nets]
            ref = StableDiffusionControlNetPipeline(
                vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                controlnet=loaded if len(loaded) > 1 else loaded[0])
            ref.set_progress_bar_config(disable=True)
            refs[key] = ref
        out[fam] = dict(folders=folders, bundles=bundles, refs=refs, nets=[sdrt.ControlNet.load(b) for b in bundles])
    return out


def reference(ref, sampler, images, lat, guidance=7.5, steps=6, weight=1.0, start=0.0, end=1.0, guess=False,
              negative=None, prompt=PROMPT):
    use_scheduler(ref, sampler)
    many = isinstance(images, list) and len(images) > 1
    out = ref(prompt, image=images if many else images[0], negative_prompt=negative, latents=torch.from_numpy(lat),
              num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=len(lat),
              controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
              guess_mode=guess, output_type="np").images
    return (out * 255).round() / 255


def ours(pipe, nets, images, lat, sampler="euler", guidance=7.5, steps=6, weight=1.0, start=0.0, end=1.0,
         guess=False, negative=""):
    per = lambda v, k: v[k] if isinstance(v, list) else v  # noqa: E731
    controls = [sdrt.Control(net, img, weight=per(weight, k), start=per(start, k), end=per(end, k))
                for k, (net, img) in enumerate(zip(nets, images))]
    return pipe.txt2img(PROMPT, negative_prompt=negative, latents=lat, steps=steps, guidance=guidance,
                        sampler=sampler, batch=len(lat), controls=controls, guess_mode=guess, watermark=False)


CASES = {  # name: (family, sampler, nets, options)
    "one net": ("sd1", "euler", 1, {}),
    "weight 0.5": ("sd1", "euler", 1, {"weight": 0.5}),
    "start/end 0.2-0.7": ("sd1", "euler", 1, {"start": 0.2, "end": 0.7}),
    "guess mode": ("sd1", "euler", 1, {"guess": True}),
    "two nets": ("sd1", "euler", 2, {"weight": [0.8, 0.6], "start": [0.0, 0.3]}),
    "ddim": ("sd1", "ddim", 1, {}),
    "dpmpp_2m, guidance off": ("sd1", "dpmpp_2m", 1, {"guidance": 1.0}),
    "sd2 one net": ("sd2", "euler", 1, {}),
    "sd2 guess mode": ("sd2", "ddim", 1, {"guess": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_images_match_diffusers_controlnet_pipeline(cn, pipes, case):
    fam, sampler, count, options = CASES[case]
    c = cn[fam]
    images = [control_image(7), control_image(8)][:count]
    lat = latents(2 if case == "two nets" else 1, seed=3)
    got = pixels(ours(pipes[fam], c["nets"][:count], images, lat, sampler, **options))
    theirs = {**options, "guess": options.get("guess", False)}
    want = reference(c["refs"]["one" if count == 1 else "two"], sampler, images, lat, **theirs)
    assert np.abs(got - want).max() <= TOLERANCE
    plain = pixels(pipes[fam].txt2img(PROMPT, latents=lat, steps=6, guidance=options.get("guidance", 7.5),
                                      sampler=sampler, batch=len(lat), watermark=False))
    assert np.abs(got - plain).mean() > 2 / 255  # the control visibly steers the image


def test_the_control_image_matters_and_weight_zero_is_the_plain_unet(cn, pipes):
    pipe, net, lat = pipes["sd1"], cn["sd1"]["nets"][0], latents(1, seed=4)
    a, b = (pixels(ours(pipe, [net], [control_image(s)], lat)) for s in (1, 2))
    assert np.abs(a - b).mean() > 2 / 255
    off = pixels(ours(pipe, [net], [control_image(1)], lat, weight=0.0))  # zero residuals, every step
    plain = pixels(pipe.txt2img(PROMPT, latents=lat, steps=6, sampler="euler", watermark=False))
    assert np.abs(off - plain).max() == 0


def test_the_residual_unet_with_zero_residuals_is_the_plain_unet(bundles):
    from sdrt.export.controlnet_unet import residual_feeds
    from sdrt.runtime.engines import OrtEngine
    from sdrt.runtime.manifest import load_manifest

    for fam, b in bundles.items():
        m = load_manifest(b)
        layout = m.residuals
        assert len(layout) == 5  # conv_in, 2 + 1 in block 0 (layers, downsampler), 1 in block 1, mid
        rng = np.random.default_rng(0)
        feeds = {names.SAMPLE: rng.standard_normal((2, 4, 9, 7), dtype=np.float32),  # odd: ceil(n/2) levels
                 names.TIMESTEP: np.array([400.0, 20.0], np.float32),
                 names.ENCODER_HIDDEN_STATES: rng.standard_normal((2, 77, m.text_hidden_size), dtype=np.float32)}
        for comp_graphs in (m.graphs, m.cpu_graphs):
            rel = lambda c: comp_graphs[c].path if hasattr(comp_graphs[c], "path") else comp_graphs[c]  # noqa: E731
            plain = OrtEngine(b / rel(names.UNET), names.UNET)(**feeds)[names.OUT_SAMPLE]
            variant = OrtEngine(b / rel(names.UNET_CONTROLNET), names.UNET_CONTROLNET)
            got = variant(**feeds, **residual_feeds(layout, 2, 9, 7))[names.OUT_SAMPLE]
            assert np.array_equal(got, plain)
        sizes = {name: data for name, data in ((p.name, p.stat().st_size) for p in (b / "unet").iterdir())}
        assert sizes[names.CONTROLNET_MODEL_FILE] < sizes[names.MODEL_FILE] * 1.2  # structure only: no weights
        assert "model.controlnet.onnx_data" not in sizes


def test_png_parameters_record_each_controlnet(cn, pipes):
    net = cn["sd1"]["nets"][0]
    image = pipes["sd1"].txt2img(PROMPT, steps=2, seed=1, watermark=False,
                                 controls=[sdrt.Control(net, control_image(1), weight=0.5, start=0.1, end=0.9)])[0]
    text = image.info["parameters"]
    assert (f'ControlNet 0: "Module: none, Model: {net.name} [{net.manifest.short_hash}], Weight: 0.5, '
            'Resize Mode: Just Resize, Guidance Start: 0.1, Guidance End: 0.9, Control Mode: Balanced"') in text


def test_size_comes_from_the_control_image_and_it_is_resized(cn, pipes):
    net = cn["sd1"]["nets"][0]
    image = pipes["sd1"].txt2img(PROMPT, steps=2, seed=1, controls=[sdrt.Control(net, control_image(1, 96))])[0]
    assert image.size == (96, 96)
    image = pipes["sd1"].txt2img(PROMPT, steps=2, seed=1, height=64, width=80,
                                 controls=[sdrt.Control(net, control_image(1, 96))])[0]
    assert image.size == (80, 64)


def test_every_mode_takes_controls(cn, pipes):
    pipe, net = pipes["sd1"], cn["sd1"]["nets"][0]
    src = control_image(11).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    controls = [sdrt.Control(net, control_image(1))]
    runs = {"img2img": lambda **o: pipe.img2img(src, PROMPT, strength=0.8, **o),
            "inpaint": lambda **o: pipe.inpaint(src, mask, PROMPT, **o),
            "inpaint only masked": lambda **o: pipe.inpaint(src, mask, PROMPT, only_masked=True, padding=8, **o),
            "outpaint": lambda **o: pipe.outpaint(src.resize((48, 64)), PROMPT, right=16, **o)}
    for mode, run in runs.items():
        with_c, without = (pixels(run(steps=4, seed=2, watermark=False, **o)) for o in ({"controls": controls}, {}))
        assert np.abs(with_c - without).mean() > 1 / 255, mode
    kept = np.asarray(pipe.inpaint(src, mask, PROMPT, steps=3, seed=2, mask_blur=0, controls=controls)[0])
    assert np.array_equal(kept[:8], np.asarray(src)[:8])  # outside the mask: the input's pixels


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """A ControlNet for single_file_fixture's LDM-style SD1 model (GroupNorm(32), 8 heads: what a single file
    cannot record), as a folder and as the original-layout file, each exported, and the model's bundle."""
    from single_file_fixture import build_ldm_model

    from sdrt.export import export_bundle, export_controlnet

    root = tmp_path_factory.mktemp("controlnet-file")
    model = build_ldm_model(root / "model", "sd1", seed=2)
    folder = build_controlnet(model, root / "control_tiny_canny", seed=6)
    file = write_single_file(folder, root / "control_tiny_canny.safetensors")
    export_bundle(model, root / "bundle", **QUIET)
    pth = root / "control_tiny_canny.pth"  # as lllyasviel's v1.1 files: a pickled state dict
    torch.save(dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(file))), str(pth))
    for src, out in ((folder, "from-folder"), (file, "from-file")):
        export_controlnet(src, root / out, height=64, width=64, **QUIET)
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        export_controlnet(pth, root / "from-pth", height=64, width=64, **QUIET)
    export_controlnet(pth, root / "from-pth", height=64, width=64, allow_pickle=True, **QUIET)
    return root


def test_a_single_file_controlnet_exports_as_its_folder_does(single_file):
    pipe = sdrt.Pipeline.load(single_file / "bundle")
    got = [pixels(pipe.txt2img(PROMPT, steps=4, seed=3, watermark=False, controls=[
        sdrt.Control(sdrt.ControlNet.load(single_file / b), control_image(1))]))
        for b in ("from-folder", "from-file", "from-pth")]
    assert np.abs(got[0] - got[1]).max() == 0 and np.abs(got[0] - got[2]).max() == 0
    plain = pixels(pipe.txt2img(PROMPT, steps=4, seed=3, watermark=False))
    assert np.abs(got[0] - plain).mean() > 2 / 255
    manifest = json.loads((single_file / "from-file" / "sdrt.json").read_text())
    assert manifest["name"] == "control_tiny_canny" and manifest["text_width"] == 64
    assert len(manifest["residuals"]) == 5 and manifest["format"] == "sdrt-controlnet"


def test_the_cli_exports_a_pickled_controlnet_only_with_allow_pickle(single_file, tmp_path, capsys):
    from test_cli import run

    pth = single_file / "control_tiny_canny.pth"
    code, _, err = run(capsys, "export", pth, "--out", tmp_path / "no")
    assert code != 0 and "--allow-pickle" in err and not (tmp_path / "no").exists()
    code, out, err = run(capsys, "export", pth, "--out", tmp_path / "yes", "--allow-pickle", "--height", 64,
                         "--width", 64)
    assert code == 0 and "ControlNet for sd models with 64-wide text, 5 residuals" in out, err


def test_a_controlnet_for_another_model_is_refused_naming_both(single_file, pipes):
    net = sdrt.ControlNet.load(single_file / "from-file")
    with pytest.raises(InvalidRequest, match=r"made for a sd model with 64-wide text.*'sd1' is a sd model with "
                                             r"32-wide text"):
        pipes["sd1"].txt2img(PROMPT, steps=1, controls=[sdrt.Control(net, control_image(1))])


@pytest.mark.parametrize("kwargs,message", [
    ({"weight": -1}, "weight must be a number from 0 to 10"),
    ({"start": 0.6, "end": 0.4}, "start 0.6 must be below end 0.4"),
    ({"end": "high"}, "end must be a number"),
    ({"preprocess": "openpose"}, "preprocessor 'openpose' is not one of none, canny, invert, depth"),
    ({"image": b"not an image"}, "control image"),
    ({"preprocess": "depth"}, "this bundle has none"),
])
def test_bad_controls_are_refused(cn, pipes, kwargs, message):
    control = sdrt.Control(**{"net": cn["sd1"]["nets"][0], "image": control_image(1), **kwargs})
    with pytest.raises(InvalidRequest, match=message):
        pipes["sd1"].txt2img(PROMPT, steps=1, controls=[control])
    with pytest.raises(InvalidRequest, match="give sdrt.Control"):
        pipes["sd1"].txt2img(PROMPT, steps=1, controls=["canny.png"])


def test_bundles_of_the_wrong_kind_and_corrupt_ones_are_refused(cn, bundles, tmp_path):
    with pytest.raises(InvalidRequest, match="is a ControlNet bundle, not a model"):
        sdrt.Pipeline.load(cn["sd1"]["bundles"][0])
    with pytest.raises(InvalidRequest, match="is not a ControlNet bundle"):
        sdrt.ControlNet.load(bundles["sd1"])
    broken = tmp_path / "broken"
    shutil.copytree(cn["sd1"]["bundles"][0], broken)
    with open(broken / "controlnet" / "model.onnx_data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleCorrupt, match="does not match its sha256"):
        sdrt.ControlNet.load(broken)
    manifest = json.loads((broken / "sdrt.json").read_text())
    manifest["graphs"] = {}
    (broken / "sdrt.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleCorrupt, match="lists no graph for controlnet"):
        sdrt.ControlNet.load(broken)


def test_a1111_control_modes_scale_softly_and_give_the_negative_rows_no_control(cn, pipes):
    """sd-webui-controlnet's rule: residual r of R times weight * 0.825^(R-1-r); "ControlNet is more important"
    also zeroes the negative rows (its cfg injection)."""
    from sdrt.runtime.controls import CONTROL_MODES, Guide, check_controls

    net, rng = cn["sd1"]["nets"][0], np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    t, text = np.full(2, 500.0, np.float32), rng.standard_normal((2, 77, 32), dtype=np.float32)
    out = {}
    for mode in (0, "prompt", CONTROL_MODES[2]):
        control = sdrt.Control(net, control_image(1), weight=0.7, mode=mode)
        guide = Guide.make(check_controls([control], False), False, 64, 64, 1, True)
        out[guide.controls[0].mode] = guide.residuals(0, 1, x, t, text, True)
    balanced, prompt, control = (out[m] for m in CONTROL_MODES)
    names_ = list(balanced)
    for r, k in enumerate(names_):
        ramp = 0.825 ** (len(names_) - 1 - r)
        np.testing.assert_allclose(prompt[k], balanced[k] * np.float32(ramp), rtol=1e-5, atol=1e-6)
        assert not control[k][:1].any()  # the negative row
        np.testing.assert_allclose(control[k][1:], prompt[k][1:], rtol=1e-5, atol=1e-6)
    image = pipes["sd1"].txt2img(PROMPT, steps=3, seed=1, watermark=False,
                                 controls=[sdrt.Control(net, control_image(1), mode="controlnet")])[0]
    assert "Control Mode: ControlNet is more important" in image.info["parameters"]
    with pytest.raises(InvalidRequest, match="control mode 'loud' is not one of"):
        pipes["sd1"].txt2img(PROMPT, steps=1, controls=[sdrt.Control(net, control_image(1), mode="loud")])


def test_after_a_controlnet_request_the_plain_steps_run_on_the_one_unet_session(cn, bundles, tmp_path):
    """Once the residual U-Net is open, it also computes the plain U-Net (zero residuals) and the plain session is
    closed: one copy of the weights. The same pixels either way, also across a LoRA that reopens the U-Net."""
    from safetensors.numpy import save_file

    from sdrt.runtime.controls import PlainThroughResiduals
    from sdrt.runtime.engines import OrtEngine

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a (32, 32) projection
    save_file({f"{key}.lora_down.weight": np.ones((2, 32), np.float32) * 0.1,
               f"{key}.lora_up.weight": np.ones((32, 2), np.float32) * 0.1}, str(tmp_path / "glow.safetensors"))
    plain_only, pipe = sdrt.Pipeline.load(bundles["sd1"]), sdrt.Pipeline.load(bundles["sd1"])  # the first never
    net, kw = cn["sd1"]["nets"][0], dict(steps=4, seed=5, watermark=False)  # sees a ControlNet
    controls = [sdrt.Control(net, control_image(2), end=0.5)]  # half the steps plain
    lora = [(tmp_path / "glow.safetensors", 1.0)]
    want = {"plain": pixels(plain_only.txt2img(PROMPT, **kw)),
            "lora": pixels(plain_only.txt2img(PROMPT, loras=lora, **kw))}
    plain_only.set_loras([])
    assert np.abs(pixels(pipe.txt2img(PROMPT, controls=controls, **kw)) - want["plain"]).mean() > 1 / 255
    assert isinstance(pipe.engines[names.UNET], PlainThroughResiduals)
    assert np.array_equal(pixels(pipe.txt2img(PROMPT, **kw)), want["plain"])
    assert np.array_equal(pixels(pipe.txt2img(PROMPT, loras=lora, **kw)), want["lora"])
    assert type(pipe.engines[names.UNET]) is OrtEngine  # the LoRA reopened the plain graph on its weights
    with_both = pixels(pipe.txt2img(PROMPT, loras=lora, controls=controls, **kw))
    assert isinstance(pipe.engines[names.UNET], PlainThroughResiduals)
    assert np.array_equal(pixels(pipe.txt2img(PROMPT, loras=lora, **kw)), want["lora"])
    assert np.abs(with_both - want["lora"]).mean() > 1 / 255
