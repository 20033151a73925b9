"""img2img, inpainting and outpainting against diffusers' pipelines, on the same weights, with diffusers handed
the random numbers sdrt drew (image-encoder samples and noise); and the promise that kept pixels stay put.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import pixels
from PIL import Image
from test_parity import use_scheduler
from tiny_models import build_model

from sdrt.errors import InvalidRequest

TOLERANCE = 2 / 255
VAE_MODULE = "diffusers.models.autoencoders.vae"


def photo(size=(64, 64), seed=0) -> Image.Image:
    """Smooth colour ramps with a bright square: an input the tiny VAE can encode."""
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    a = np.stack([0.5 + 0.4 * np.sin(4 * x + seed), 0.5 + 0.4 * np.cos(3 * y), 0.5 + 0.3 * np.sin(5 * (x + y))], -1)
    a[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = (0.9, 0.2, 0.1)
    return Image.fromarray((a * 255).astype(np.uint8))


def square_mask(size=(64, 64)) -> Image.Image:
    m = np.zeros(size[::-1], np.uint8)
    m[16:48, 24:56] = 255
    return Image.fromarray(m)


class Draws:
    """Records the request generator's draws so they can be replayed into diffusers, module by module."""

    def __init__(self, monkeypatch):
        from sdrt.runtime import request

        self.monkeypatch, self.draws, original = monkeypatch, [], request.BatchNoise.standard_normal

        def record(noise, shape, dtype=np.float32):
            self.draws.append(original(noise, shape, dtype))
            return self.draws[-1]

        monkeypatch.setattr(request.BatchNoise, "standard_normal", record)

    def replay(self, plan: dict[str, list[int]], extra_vae: int = 0):
        """plan: diffusers module -> indices of our draws it gets, in order."""
        queues = {}
        for module, indices in plan.items():
            queue = [torch.from_numpy(self.draws[i]) for i in indices]
            if module == VAE_MODULE:
                queue += [torch.zeros_like(queue[0])] * extra_vae  # draws diffusers makes and then ignores
            queues[module] = queue
            self.monkeypatch.setattr(importlib.import_module(module), "randn_tensor",
                                     lambda shape, q=queue, **kw: q.pop(0).reshape(shape))
        return queues


def assert_inpainted_like(out: Image.Image, want: np.ndarray) -> None:
    """Inside the mask: diffusers' pixels (within 2/255); outside: the input's, exactly."""
    inside = np.asarray(square_mask()) > 0
    got = np.asarray(out, np.float32) / 255
    assert np.abs(got - (want * 255).round() / 255)[inside].max() <= TOLERANCE
    assert np.array_equal(np.asarray(out)[~inside], np.asarray(photo())[~inside])


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    """A 9-channel inpainting model, its bundle, sdrt's pipeline and diffusers' StableDiffusionInpaintPipeline."""
    import sdrt
    from diffusers import StableDiffusionInpaintPipeline

    from sdrt.export import export_bundle

    root = tmp_path_factory.mktemp("inpaint")
    src = build_model(root / "src", "sd1", seed=3, in_channels=9)
    export_bundle(src, root / "bundle", log=lambda *_: None)
    ref = StableDiffusionInpaintPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return sdrt.Pipeline.load(root / "bundle"), ref


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(monkeypatch, pipes, reference, family, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    draws = Draws(monkeypatch)
    got = pixels(pipes[family].img2img(photo(), "a red circle", strength=strength, steps=10, seed=4))
    ref = StableDiffusionImg2ImgPipeline(**reference[family].components)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, "euler")
    draws.replay({VAE_MODULE: [0], "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img": [1]})
    want = ref("a red circle", image=photo(), strength=strength, num_inference_steps=10, output_type="np").images
    assert np.abs(got - (want * 255).round() / 255).max() <= TOLERANCE


def test_inpainting_model_matches_diffusers_inside_the_mask_and_keeps_the_rest(monkeypatch, inpainting):
    pipe, ref = inpainting
    draws = Draws(monkeypatch)
    out = pipe.inpaint(photo(), square_mask(), "a blue square", steps=8, seed=2, mask_blur=0)[0]
    use_scheduler(ref, "euler")
    draws.replay({"diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint": [0], VAE_MODULE: [1]})
    want = ref("a blue square", image=photo(), mask_image=square_mask(), num_inference_steps=8,
               output_type="np").images[0]
    assert_inpainted_like(out, want)


def test_ordinary_model_inpaints_like_diffusers_and_keeps_the_rest(monkeypatch, pipes, reference):
    from diffusers import StableDiffusionInpaintPipeline

    draws = Draws(monkeypatch)
    out = pipes["sd1"].inpaint(photo(), square_mask(), "a blue square", steps=8, seed=2, mask_blur=0)[0]
    ref = StableDiffusionInpaintPipeline(**reference["sd1"].components)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, "euler")
    draws.replay({VAE_MODULE: [0], "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint": [1]},
                 extra_vae=1)  # diffusers also encodes the masked image, which a 4-channel U-Net never sees
    want = ref("a blue square", image=photo(), mask_image=square_mask(), num_inference_steps=8,
               output_type="np").images[0]
    assert_inpainted_like(out, want)


@pytest.mark.parametrize("only_masked", [False, True])
def test_blurred_inpainting_leaves_pixels_outside_the_blur_untouched(pipes, only_masked):
    from PIL import ImageFilter

    out = pipes["sd1"].inpaint(photo(), square_mask(), "a cat", steps=4, seed=1, mask_blur=4,
                               only_masked=only_masked, padding=8)[0]
    assert out.size == (64, 64)
    untouched = np.asarray(square_mask().filter(ImageFilter.GaussianBlur(4))) == 0
    assert np.array_equal(np.asarray(out)[untouched], np.asarray(photo())[untouched])
    inside = np.asarray(square_mask()) > 0
    assert np.abs(np.asarray(out, float) - np.asarray(photo(), float))[inside].mean() > 5
    assert ("Inpaint area: Only masked" in out.info["parameters"]) == only_masked


@pytest.mark.parametrize("fill", ["edge", "noise"])
def test_outpainting_extends_the_canvas_and_keeps_the_original(pipes, fill):
    out = pipes["sd1"].outpaint(photo(), "a landscape", left=16, top=8, right=0, bottom=24, fill=fill,
                                steps=4, seed=3)[0]
    assert out.size == (64 + 16, 64 + 8 + 24)
    assert np.array_equal(np.asarray(out)[8:72, 16:80], np.asarray(photo()))
    assert "Outpaint: left 16, top 8, bottom 24" in out.info["parameters"]


def test_inpainting_model_also_outpaints(inpainting):
    out = inpainting[0].outpaint(photo(), "sky", right=16, steps=3, seed=1)[0]
    assert out.size == (80, 64) and np.array_equal(np.asarray(out)[:, :64], np.asarray(photo()))


def test_images_are_read_with_exif_orientation_and_any_mode(pipes, tmp_path):
    tall = photo((64, 72))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 72x64, shown 64x72
    tall.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    out = pipes["sd1"].img2img(tmp_path / "rotated.jpg", "x", strength=0.5, steps=2, seed=1)[0]
    assert out.size == (64, 72)
    rgba = photo().convert("RGBA")
    assert pipes["sd1"].img2img(rgba, "x", strength=0.5, steps=2, seed=1)[0].size == (64, 64)
    alpha_mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    alpha_mask.paste((255, 255, 255, 255), (8, 8, 24, 24))  # strokes on a transparent layer
    out = pipes["sd1"].inpaint(photo(), alpha_mask, "x", steps=2, seed=1, mask_blur=0)[0]
    assert np.array_equal(np.asarray(out)[32:], np.asarray(photo())[32:])


def test_bad_image_requests_say_what_to_do(pipes, inpainting, tmp_path):
    pipe = pipes["sd1"]
    cases = [
        (lambda: pipe.inpaint(photo(), square_mask((64, 56)), "x"), "mask is 64x56 but the image is 64x64"),
        (lambda: pipe.img2img(photo(), "x", strength=0), "strength must be a number in (0, 1], got 0"),
        (lambda: pipe.img2img(photo(), "x", strength=1.5), "strength must be a number in (0, 1], got 1.5"),
        (lambda: pipe.img2img(photo(), "x", strength=0.05, steps=10), "leaves no step to run"),
        (lambda: pipe.img2img(photo((70, 64)), "x"), "the image is 70x64; its sides must be multiples of 8: use 64x64"),
        (lambda: pipe.img2img(photo(), "x", width=128), "the image is 64x64 but 128x64 was asked for"),
        (lambda: pipe.outpaint(photo(), "x", left=12), "outpaint sides must be multiples of 8"),
        (lambda: pipe.outpaint(photo(), "x"), "at least one above 0"),
        (lambda: pipe.outpaint(photo(), "x", left=8, fill="blur"), "fill must be one of edge, noise"),
        (lambda: pipe.inpaint(photo(), Image.new("L", (64, 64)), "x", only_masked=True), "the mask is empty"),
        (lambda: pipe.img2img(tmp_path / "none.png", "x"), "image file"),
        (lambda: inpainting[0].img2img(photo(), "x"), "img2img needs a U-Net with 4 input channels; this bundle's "
                                                      "has 9 (an inpainting model)"),
        (lambda: inpainting[0].txt2img("x"), "text-to-image needs a U-Net with 4 input channels"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidRequest) as e:
            call()
        assert message in str(e.value)
    assert pipe.img2img(photo((70, 66)), "x", resize=True, strength=0.5, steps=2, seed=1)[0].size == (64, 64)


def test_cli_modes_write_pngs_with_their_parameters(bundles, tmp_path, capsys):
    from sdrt.cli import main

    photo().save(tmp_path / "in.png")
    square_mask().save(tmp_path / "mask.png")
    runs = [
        (["img2img", tmp_path / "in.png", "a cat", "--strength", "0.5"], "Denoising strength: 0.5"),
        (["inpaint", tmp_path / "in.png", tmp_path / "mask.png", "a cat", "--mask-blur", "2"], "Mask blur: 2"),
        (["outpaint", tmp_path / "in.png", "a cat", "--right", "16"], "Outpaint: right 16"),
    ]
    for i, (argv, expected) in enumerate(runs):
        out = tmp_path / f"out{i}.png"
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv] + ["--model", str(bundles["sd1"]), "--out", str(out), "--steps", "2",
                                          "--seed", "1"])
        assert e.value.code == 0, capsys.readouterr().err
        assert expected in Image.open(out).text["parameters"]
    with pytest.raises(SystemExit) as e:
        main(["img2img", str(tmp_path / "in.png"), "x", "--strength", "2", "--model", str(bundles["sd1"]),
              "--out", str(tmp_path / "bad.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: strength must be a number in (0, 1], got 2.0") and err.count("\n") == 1
    assert not (tmp_path / "bad.png").exists()


def _add_depth_estimator(root) -> None:
    """A tiny DPT (the SD 2 depth layout's depth_estimator + feature_extractor), its head scaled so that its
    random-weight depth is not all zeros."""
    import json

    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(7)
    dpt = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=384,
        patch_size=32, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
        head_in_index=-1)).eval()
    with torch.no_grad():
        for p in dpt.head.parameters():
            p.mul_(8.0)
        dpt.head.head[-2].bias.fill_(1.0)  # the last conv before the ReLU: keep its output positive
    dpt.save_pretrained(root / "depth_estimator")
    DPTImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      keep_aspect_ratio=False).save_pretrained(root / "feature_extractor")
    index = json.loads((root / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionDepth2ImgPipeline", "depth_estimator": ["transformers", "DPTForDepthEstimation"],
              "feature_extractor": ["transformers", "DPTImageProcessor"]}
    index.pop("safety_checker"), index.pop("requires_safety_checker")
    (root / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def depth(tmp_path_factory):
    """An SD 2-style depth model (5-channel U-Net) with a depth estimator, its bundle and diffusers' pipeline."""
    import sdrt
    from diffusers import StableDiffusionDepth2ImgPipeline

    from sdrt.export import export_bundle

    root = tmp_path_factory.mktemp("depth")
    src = build_model(root / "src", "sd2", seed=5, in_channels=5)
    _add_depth_estimator(src)
    export_bundle(src, root / "bundle", log=lambda *_: None)
    ref = StableDiffusionDepth2ImgPipeline.from_pretrained(src)
    ref.set_progress_bar_config(disable=True)
    return sdrt.Pipeline.load(root / "bundle"), ref


def depth_map(shape=(48, 40)) -> np.ndarray:
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    return (1.0 + x / shape[1] + 0.5 * np.sin(y / 6.0)).astype(np.float32)


@pytest.mark.parametrize("as_file", [None, "npy", "png16"])
def test_depth2img_matches_diffusers_with_the_same_depth_map(monkeypatch, depth, tmp_path, as_file):
    pipe, ref = depth
    d = depth_map()
    given = d
    if as_file == "npy":
        np.save(tmp_path / "d.npy", d)
        given = tmp_path / "d.npy"
    elif as_file == "png16":  # 16-bit PNG: quantize first, so both sides see the same values
        d = np.round((d - d.min()) / (d.max() - d.min()) * 65535).astype(np.uint16)
        Image.fromarray(d).save(tmp_path / "d.png")
        given, d = tmp_path / "d.png", d.astype(np.float32)
    draws = Draws(monkeypatch)
    got = pixels(pipe.depth2img(photo(), "a room", depth=given, steps=10, seed=3))
    use_scheduler(ref, "euler")
    draws.replay({VAE_MODULE: [0], "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_depth2img": [1]})
    want = ref("a room", image=photo(), depth_map=torch.from_numpy(d)[None], strength=0.8, num_inference_steps=10,
               output_type="np").images
    assert np.abs(got - (want * 255).round() / 255).max() <= TOLERANCE


def test_depth_is_estimated_by_the_exported_dpt_when_not_given(depth):
    """Same preprocessing as diffusers' feature extractor, same DPT: the same depth."""
    pipe, ref = depth
    ours = pipe.estimate_depth(photo())
    with torch.no_grad():
        inputs = ref.feature_extractor(images=[photo()], return_tensors="pt").pixel_values
        want = ref.depth_estimator(inputs).predicted_depth[0].numpy()
    assert ours.shape == want.shape and ours.std() > 0
    assert np.abs(ours - want).max() <= 1e-3 * np.abs(want).max()
    out = pipe.depth2img(photo(), "a room", steps=3, seed=1)[0]
    assert out.size == (64, 64) and "Depth: estimated" in out.info["parameters"]


def test_depth2img_refusals(pipes, depth, tmp_path):
    pipe = depth[0]
    cases = [
        (lambda: pipes["sd1"].depth2img(photo(), "x", depth=depth_map()), "depth2img needs a U-Net with 5 input"),
        (lambda: pipe.depth2img(photo(), "x", depth=np.ones((8, 8))), "depth map is flat"),
        (lambda: pipe.depth2img(photo(), "x", depth=np.ones((2, 8, 8))), "depth map must be 2-D"),
        (lambda: pipe.depth2img(photo(), "x", depth=tmp_path / "none.npy"), "does not exist"),
        (lambda: pipe.txt2img("x"), "text-to-image needs a U-Net with 4 input channels; this bundle's has 5"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidRequest) as e:
            call()
        assert message in str(e.value)


def test_a_v_prediction_model_exported_at_768_generates_at_768(tmp_path):
    """SD 2.x-768: the U-Net's sample_size 96 makes 768x768 the bundle's default, and images match diffusers."""
    import json

    import sdrt
    from diffusers import StableDiffusionPipeline

    from sdrt.export import export_bundle

    src = build_model(tmp_path / "src", "sd2", seed=6, sample_size=96)
    export_bundle(src, tmp_path / "b", log=lambda *_: None)
    m = json.loads((tmp_path / "b" / "sdrt.json").read_text())
    assert (m["default_height"], m["default_width"], m["prediction_type"]) == (768, 768, "v_prediction")
    lat = np.random.default_rng(0).standard_normal((1, 4, 96, 96)).astype(np.float32)
    got = pixels(sdrt.Pipeline.load(tmp_path / "b").txt2img("a red circle", steps=3, latents=lat, watermark=False))
    assert got.shape == (1, 768, 768, 3)
    ref = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    use_scheduler(ref, "euler")
    want = ref("a red circle", num_inference_steps=3, latents=torch.from_numpy(lat), output_type="np").images
    assert np.abs(got - (want * 255).round() / 255).max() <= TOLERANCE
