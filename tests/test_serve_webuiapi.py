"""sdrt serve driven by webuiapi, the AUTOMATIC1111 client on PyPI, as its users call it."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from sdrt.serve import Settings
from sdrt.serve.app import Access
from serve_helpers import pixels, running_server, wait_until

webuiapi = pytest.importorskip("webuiapi")
SIZE = {"width": 64, "height": 64}  # the embedded model's size (webuiapi's default is 512x512)


@pytest.fixture(scope="module")
def server(bundles):
    with running_server([None, bundles["sd1"]], Settings(batch_window_s=0.0)) as running:
        yield running


@pytest.fixture
def api(server):
    client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=4)
    yield client
    client.util_set_model("sdrt-embedded")


def test_txt2img(api):
    result = api.txt2img(prompt="a small red circle on a blue background", seed=1, batch_size=2, cfg_scale=7, **SIZE)
    assert [im.size for im in result.images] == [(64, 64)] * 2
    assert result.info["all_seeds"] == [1, 2] and result.info["sampler_name"] == "Euler a"
    assert result.info["infotexts"][1].splitlines()[-1].startswith("Steps: 4, Sampler: Euler a, CFG scale: 7.0, Seed: 2,")
    assert result.parameters["prompt"] == "a small red circle on a blue background"
    assert api.png_info(result.images[0]).info == result.info["infotexts"][0]


def test_img2img_and_inpaint(api):
    import sdrt

    pipe = sdrt.Pipeline.load()
    init = pipe.txt2img("a large yellow square on a green background", steps=4, seed=3)[0]
    result = api.img2img(images=[init], prompt="a blue square", denoising_strength=0.6, seed=5, cfg_scale=7, **SIZE)
    want = pipe.img2img(init, "a blue square", strength=0.6, steps=4, seed=5, guidance=7.0, sampler="euler_a")[0]
    assert np.abs(pixels(result.images[0]) - pixels(want)).max() == 0
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (24, 24, 40, 40))
    painted = api.img2img(images=[init], mask_image=mask, prompt="a red dot", seed=5, denoising_strength=0.9,
                          **SIZE).images[0]  # webuiapi's defaults: only masked, fill, blur 4
    outside = np.ones((64, 64), bool)
    outside[12:52, 12:52] = False
    assert painted.size == (64, 64) and (pixels(painted)[outside] == pixels(init)[outside]).all()
    assert not (pixels(painted)[28:36, 28:36] == pixels(init)[28:36, 28:36]).all()


def test_options_and_model_switch(api):
    assert api.util_get_current_model().startswith("sdrt-embedded [")
    api.util_set_model("sd1")
    assert api.util_get_current_model().startswith("sd1 [")
    result = api.txt2img(prompt="a cat", seed=1, steps=2)
    assert result.info["sd_model_name"] == "sd1"
    assert {m["model_name"] for m in api.get_sd_models()} == {"sdrt-embedded", "sd1"}
    assert "Euler a" in [s["name"] for s in api.get_samplers()]


def test_progress_and_interrupt(api):
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", api.txt2img(
        prompt="a red square", seed=1, steps=1000, width=256, height=256)), daemon=True)
    worker.start()
    wait_until(lambda: api.get_progress()["progress"] > 0.011, what="progress reported")
    assert api.get_progress()["state"]["sampling_steps"] == 1000
    api.interrupt()
    worker.join(60)
    assert not worker.is_alive() and len(out["r"].images) == 1
    api.util_wait_for_ready(check_interval=0.1)  # progress 0 and job_count 0 again


def test_auth():
    with running_server(access=Access(users=(("ann", "pw"),))) as s:
        anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=s.port, steps=2)
        with pytest.raises(RuntimeError) as refused:
            anonymous.txt2img(prompt="x", **SIZE)
        assert refused.value.args[0] == 401
        client = webuiapi.WebUIApi(host="127.0.0.1", port=s.port, steps=2, username="ann", password="pw")
        assert len(client.txt2img(prompt="x", **SIZE).images) == 1
