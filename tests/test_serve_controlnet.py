"""ControlNet through the server, as the A1111 extension's clients send it: alwayson_scripts.controlnet units
(webuiapi's ControlNetUnit), equal to the Python API's Control; the extension's list routes; bad units."""
from __future__ import annotations

import numpy as np
import pytest
import requests
from PIL import Image

from sdrt.serve import LoadOptions, ModelSet, Settings
from serve_helpers import b64_png, decoded, pixels, running_server

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from controlnet_models import build_controlnet

    from sdrt import embedded
    from sdrt.export import export_controlnet

    root = tmp_path_factory.mktemp("serve-cn")
    folder = build_controlnet(embedded.MODEL, root / "cn-src", seed=7)
    bundle = root / "control_tiny_canny"
    export_controlnet(folder, bundle, log=lambda *_: None)
    models = ModelSet([], LoadOptions(controlnets=(bundle,)))
    with running_server(settings=Settings(batch_window_s=0.0), models=models) as s:
        yield s, bundle


def _control_image():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (16, 8, 48, 56))
    return image


def test_units_equal_the_python_api(served):
    import sdrt

    s, bundle = served
    title = requests.get(s.base + "/controlnet/model_list", timeout=10).json()["model_list"][0]
    assert title.startswith("control_tiny_canny [")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port, sampler="Euler", steps=6)
    unit = webuiapi.ControlNetUnit(image=_control_image(), module="canny", model=title, weight=0.8,
                                   guidance_start=0.1, guidance_end=0.9, threshold_a=80, threshold_b=160,
                                   control_mode=2)
    got = api.txt2img(prompt="a red square", seed=3, cfg_scale=7, width=64, height=64, controlnet_units=[unit],
                      alwayson_scripts={})
    pipe = sdrt.Pipeline.load()
    cn = sdrt.ControlNet.load(bundle)
    want = pipe.txt2img("a red square", seed=3, steps=6, guidance=7.0, sampler="euler", controls=[
        sdrt.Control(cn, _control_image(), 0.8, 0.1, 0.9, "canny", 80, 160, "ControlNet is more important")])[0]
    assert np.abs(pixels(got.images[0]) - pixels(want)).max() == 0
    assert got.images[0].info["parameters"] == want.info["parameters"]
    # (webuiapi adds units to its mutable default alwayson_scripts={}, so later calls without units still send
    # them: a fresh dict each call)
    plain = api.txt2img(prompt="a red square", seed=3, cfg_scale=7, width=64, height=64, alwayson_scripts={})
    assert np.abs(pixels(plain.images[0]) - pixels(want)).max() > 0  # the net changed the image
    off = webuiapi.ControlNetUnit(image=_control_image(), model=title, enabled=False)
    skipped = api.txt2img(prompt="a red square", seed=3, cfg_scale=7, width=64, height=64, controlnet_units=[off],
                          alwayson_scripts={})
    assert skipped.images[0].tobytes() == plain.images[0].tobytes()


def test_lists_and_bad_units(served):
    s, _ = served
    assert requests.get(s.base + "/controlnet/module_list", timeout=10).json() == \
        {"module_list": ["none", "canny", "invert", "depth"]}
    assert requests.get(s.base + "/sdapi/v1/scripts", timeout=10).json() == \
        {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    image = b64_png(_control_image())
    cases = [
        ({"model": "../../x", "image": image}, "ControlNet model '../../x' is not served here; served: "
         f"{requests.get(s.base + '/controlnet/model_list', timeout=10).json()['model_list'][0]} (sdrt serve "
         "--controlnet CN_BUNDLE adds one)"),
        ({"model": "control_tiny_canny", "image": image, "module": "openpose"}, "ControlNet unit 0 module 'openpose' "
         "is not one of none, canny, invert, depth; for another preprocessor send its output as the image with "
         "module none"),
        ({"model": "control_tiny_canny"}, "ControlNet unit 0 (control_tiny_canny ["
         f"{requests.get(s.base + '/controlnet/model_list', timeout=10).json()['model_list'][0].split('[')[1]}) has "
         "no image; send its control image base64-encoded"),
        ({"model": "control_tiny_canny", "image": image, "control_mode": 7}, "control mode 7 is not one of "
         "'Balanced', 'My prompt is more important', 'ControlNet is more important' (or 0, 1, 2; balanced, prompt, "
         "controlnet)"),
    ]
    for unit, detail in cases:
        r = requests.post(s.base + "/sdapi/v1/txt2img", timeout=30, json={
            "prompt": "x", "steps": 2, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
        assert r.status_code == 400 and r.json()["detail"] == detail
    init = b64_png(Image.new("RGB", (64, 64), (90, 120, 30)))  # img2img: the init image is the control image
    r = requests.post(s.base + "/sdapi/v1/img2img", timeout=30, json={
        "prompt": "x", "steps": 2, "init_images": [init],
        "alwayson_scripts": {"controlnet": {"args": [{"model": "control_tiny_canny", "module": "none"}]}}})
    assert r.status_code == 200 and "ControlNet 0:" in decoded(r.json()["images"][0]).info["parameters"]
