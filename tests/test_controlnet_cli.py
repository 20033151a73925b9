"""ControlNet from the command line, the preprocessors, and `sdrt controlnet prepare` on an older bundle."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import pixels
from controlnet_models import build_controlnet
from PIL import Image
from test_cli import run
from test_controlnet import PROMPT, QUIET, control_image

import sdrt
from sdrt.errors import InvalidRequest
from sdrt.runtime import names


@pytest.fixture(scope="module")
def cn_bundle(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet-cli")
    folder = build_controlnet(models["sd1"], root / "edges", seed=3)
    return folder, root


def test_the_cli_exports_a_controlnet_and_generates_with_it(cn_bundle, pipes, bundles, tmp_path, capsys):
    folder, _ = cn_bundle
    out = tmp_path / "cnb"
    code, stdout, _ = run(capsys, "export", folder, "--out", out, "--height", 64, "--width", 64)
    assert code == 0 and "ControlNet for sd models with 32-wide text, 5 residuals" in stdout
    control_image(1).save(tmp_path / "edges.png")
    control_image(2).save(tmp_path / "other.png")
    png = tmp_path / "cn.png"
    code, _, err = run(capsys, "generate", PROMPT, "--model", bundles["sd1"], "--out", png, "--steps", 4,
                       "--seed", 9, "--no-watermark", "--controlnet", out, "--control-image", tmp_path / "edges.png",
                       "--controlnet", out, "--control-image", tmp_path / "other.png", "--control-weight", 0.7,
                       "--control-weight", 0.4, "--control-end", 0.8)
    assert code == 0, err
    net = sdrt.ControlNet.load(out)
    want = pipes["sd1"].txt2img(PROMPT, steps=4, seed=9, watermark=False, controls=[
        sdrt.Control(net, tmp_path / "edges.png", 0.7, 0.0, 0.8), sdrt.Control(net, tmp_path / "other.png", 0.4, 0.0, 0.8)])
    assert np.array_equal(pixels([Image.open(png)]), pixels(want))
    params = Image.open(png).text["parameters"]
    assert 'ControlNet 0: "Module: none, Model: edges' in params and "ControlNet 1:" in params

    code, _, err = run(capsys, "generate", PROMPT, "--model", bundles["sd1"], "--out", tmp_path / "x.png",
                       "--controlnet", out, "--control-image", tmp_path / "edges.png", "--control-image",
                       tmp_path / "other.png")
    assert code == 2 and "give one --control-image per --controlnet (got 1 nets and 2 images)" in err
    assert not (tmp_path / "x.png").exists()
    code, _, err = run(capsys, "generate", PROMPT, "--out", tmp_path / "x.png", "--model", out)
    assert code == 2 and "is a ControlNet bundle, not a model" in err


def test_canny_and_invert_preprocess_the_control_image(cn_bundle, pipes, tmp_path, capsys, bundles):
    import cv2

    from sdrt.export import export_controlnet
    from sdrt.runtime.preprocess import canny, invert

    folder, root = cn_bundle
    photo = Image.fromarray((np.indices((64, 64)).sum(0) % 23 * 11).astype(np.uint8)).convert("RGB")
    edges = np.asarray(canny(photo, 50, 120))
    assert np.array_equal(edges[..., 0], cv2.Canny(np.asarray(photo), 50, 120)) and set(np.unique(edges)) <= {0, 255}
    assert np.array_equal(np.asarray(invert(photo)), 255 - np.asarray(photo))
    net_dir = root / "canny-bundle"
    export_controlnet(folder, net_dir, height=64, width=64, **QUIET)
    photo.save(tmp_path / "photo.png")
    png = tmp_path / "c.png"
    code, _, err = run(capsys, "generate", PROMPT, "--model", bundles["sd1"], "--out", png, "--steps", 3,
                       "--seed", 1, "--controlnet", net_dir, "--control-image", tmp_path / "photo.png",
                       "--control-preprocess", "canny", "--canny-low", 50, "--canny-high", 120, "--no-watermark",
                       "--control-mode", "prompt")
    assert code == 0, err
    params = Image.open(png).text["parameters"]
    assert "Module: canny" in params and "Threshold A: 50, Threshold B: 120" in params
    assert "Control Mode: My prompt is more important" in params
    by_hand = pipes["sd1"].txt2img(PROMPT, steps=3, seed=1, watermark=False,
                                   controls=[sdrt.Control(sdrt.ControlNet.load(net_dir), Image.fromarray(edges),
                                                          mode="My prompt is more important")])
    assert np.array_equal(pixels([Image.open(png)]), pixels(by_hand))


def _strip_controlnet_unet(bundle):
    """What a bundle exported before ControlNet looks like: no residual U-Net, no `residuals`."""
    manifest = json.loads((bundle / "sdrt.json").read_text())
    for rel in (manifest["graphs"].pop(names.UNET_CONTROLNET)["path"], manifest["cpu_graphs"].pop(names.UNET_CONTROLNET)):
        del manifest["files"][rel]
        (bundle / rel).unlink()
    del manifest["residuals"]
    for key in [k for k in manifest["verification"]["errors"] if k.startswith(names.UNET_CONTROLNET)]:
        del manifest["verification"]["errors"][key]
    (bundle / "sdrt.json").write_text(json.dumps(manifest, indent=2))


def test_prepare_gives_an_older_bundle_the_residual_unet(cn_bundle, bundles, pipes, tmp_path, capsys):
    from sdrt.export import export_controlnet

    folder, root = cn_bundle
    net_dir = root / "prepare-net"
    export_controlnet(folder, net_dir, height=64, width=64, **QUIET)
    net = sdrt.ControlNet.load(net_dir)
    old = tmp_path / "old"
    shutil.copytree(bundles["sd1"], old)
    _strip_controlnet_unet(old)
    pipe = sdrt.Pipeline.load(old)
    controls = [sdrt.Control(net, control_image(3))]
    with pytest.raises(InvalidRequest, match="sdrt controlnet prepare BUNDLE"):
        pipe.txt2img(PROMPT, steps=2, controls=controls)
    code, stdout, err = run(capsys, "controlnet", "prepare", old)
    assert code == 0 and "takes ControlNets now" in stdout and "zero residuals = the plain U-Net" in err
    code, _, err = run(capsys, "controlnet", "prepare", old)
    assert code == 0 and "already takes ControlNets" in err
    got = sdrt.Pipeline.load(old).txt2img(PROMPT, steps=3, seed=4, watermark=False, controls=controls)
    want = pipes["sd1"].txt2img(PROMPT, steps=3, seed=4, watermark=False, controls=controls)
    assert np.array_equal(pixels(got), pixels(want))
    assert json.loads((old / "sdrt.json").read_text())["residuals"] == \
        json.loads((bundles["sd1"] / "sdrt.json").read_text())["residuals"]
    code, _, _ = run(capsys, "info", old)
    assert code == 0


def test_the_depth_preprocessor_runs_the_bundles_estimator(models, tmp_path):
    """An SD1-style text-to-image model whose folder carries a DPT (test_modes.py's), its own ControlNet."""
    from test_modes import _add_depth_estimator
    from tiny_models import build_model

    from sdrt.export import export_bundle, export_controlnet
    from sdrt.runtime.preprocess import depth_map

    src = build_model(tmp_path / "src", "sd1", seed=8)
    _add_depth_estimator(src)
    export_bundle(src, tmp_path / "bundle", **QUIET)
    export_controlnet(build_controlnet(src, tmp_path / "cn-src", seed=2), tmp_path / "cn", height=64, width=64, **QUIET)
    pipe, net = sdrt.Pipeline.load(tmp_path / "bundle"), sdrt.ControlNet.load(tmp_path / "cn")
    photo = control_image(5)
    by_preprocessor = pipe.txt2img(PROMPT, steps=3, seed=2, watermark=False,
                                   controls=[sdrt.Control(net, photo, preprocess="depth")])
    made = depth_map(pipe.estimate_depth(photo), photo.size)  # nearer = brighter, min-max to 0..255, resized
    gray = np.asarray(made)
    assert made.size == photo.size and (gray == gray[..., :1]).all() and int(gray.max()) - int(gray.min()) > 64
    by_hand = pipe.txt2img(PROMPT, steps=3, seed=2, watermark=False, controls=[sdrt.Control(net, made)])
    assert np.array_equal(pixels(by_preprocessor), pixels(by_hand))
    assert "Module: depth" in by_preprocessor[0].info["parameters"]
