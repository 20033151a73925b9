"""sdrt serve over raw HTTP: A1111's fields, responses and errors, and images equal to the CLI's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from PIL import Image

from sdrt.serve import Settings
from sdrt.serve.app import Access
from serve_helpers import b64_png, decoded, pixels, running_server

PROMPT = "a small red circle on a blue background"


@pytest.fixture(scope="module")
def server():
    with running_server(settings=Settings(batch_window_s=0.0)) as running:
        yield running


def post(server, path, body, **kw):
    return requests.post(server.base + path, json=body, timeout=60, **kw)


def test_txt2img_equals_the_cli(server, tmp_path):
    from sdrt.cli import main

    body = {"prompt": PROMPT, "negative_prompt": "green", "steps": 6, "seed": 7, "sampler_name": "DPM++ 2M",
            "scheduler": "Karras", "cfg_scale": 6.5, "batch_size": 2}
    r = post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    served = [decoded(b) for b in r.json()["images"]]
    with pytest.raises(SystemExit) as done:
        main(["generate", PROMPT, "-n", "green", "--steps", "6", "--seed", "7", "--sampler", "dpmpp_2m_karras",
              "--guidance", "6.5", "--batch", "2", "--out", str(tmp_path / "cli.png")])
    assert done.value.code == 0
    for i, image in enumerate(served):
        cli = Image.open(tmp_path / f"cli-{i}.png")
        assert np.abs(pixels(image) - pixels(cli)).max() == 0
        assert image.info["parameters"] == cli.info["parameters"]
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["all_seeds"] == [7, 8]


def test_info_seeds_and_png_info(server):
    r = post(server, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 3, "seed": 40, "batch_size": 2, "n_iter": 2,
                                           "sampler_name": "Euler a", "cfg_scale": 5})
    body = r.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 4 and info["all_seeds"] == [40, 41, 42, 43] and info["seed"] == 40
    assert info["all_prompts"] == [PROMPT] * 4 and info["index_of_first_image"] == 0
    for text, seed, image in zip(info["infotexts"], info["all_seeds"], body["images"]):
        assert f"Seed: {seed}," in text and decoded(image).info["parameters"] == text
    assert body["parameters"]["prompt"] == PROMPT and body["parameters"]["n_iter"] == 2
    # each image is its own seed's: the third equals a request for seed 42 alone
    alone = post(server, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 3, "seed": 42, "sampler_name": "Euler a",
                                               "cfg_scale": 5}).json()["images"][0]
    assert np.abs(pixels(decoded(alone)) - pixels(decoded(body["images"][2]))).max() == 0
    parsed = post(server, "/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][1]}).json()
    assert parsed["info"] == info["infotexts"][1]
    assert parsed["parameters"]["Seed"] == "41" and parsed["parameters"]["Prompt"] == PROMPT
    assert parsed["parameters"]["Sampler"] == "Euler a"


def test_random_seed_nulls_and_unknown_keys(server):
    body = {"prompt": PROMPT, "steps": 2, "seed": -1, "batch_size": 2, "sampler_name": None, "scheduler": None,
            "eta": None, "width": None, "s_churn": 0, "hr_upscaler": "Latent", "lora": "x", "image_id": 3,
            "url": "http://elsewhere", "auth": None, "restore_faces": None}
    r = post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert 0 <= info["seed"] < 4294967294 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert info["sampler_name"] == "Euler" and (info["width"], info["height"]) == (64, 64)  # the bundle's size


# What real clients send (their source, per the serving reference note): extra keys of their own, nulls.
CLIENT_PAYLOADS = {
    "sillytavern": {"prompt": PROMPT, "negative_prompt": "blurry", "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                    "steps": 3, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
                    "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "denoising_strength": 0.7,
                    "seed": 5, "save_images": False, "override_settings": {"CLIP_stop_at_last_layers": 1},
                    "override_settings_restore_afterwards": True, "url": "http://127.0.0.1:7860", "auth": ""},
    "open-webui": {"prompt": PROMPT, "batch_size": 1, "width": 64, "height": 64, "steps": 3, "negative_prompt": ""},
    "dify": {"prompt": PROMPT, "negative_prompt": "", "width": 64, "height": 64, "steps": 3, "cfg_scale": 7,
             "sampler_name": "Euler a", "seed": -1, "lora": "", "model": "sdrt-embedded", "image_id": ""},
}


@pytest.mark.parametrize("client", sorted(CLIENT_PAYLOADS))
def test_real_clients_payloads(server, client):
    headers = {"Authorization": "Bearer abc"} if client == "dify" else {}  # ignored: this server has no auth
    r = post(server, "/sdapi/v1/txt2img", CLIENT_PAYLOADS[client], headers=headers)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1 and decoded(r.json()["images"][0]).size == (64, 64)
    assert requests.get(server.base + "/queue/status", timeout=10).json()["queue_size"] == 0  # Krita's ping


def test_combined_sampler_labels_resolve_alike(server):
    base = {"prompt": PROMPT, "steps": 4, "seed": 3}
    a = post(server, "/sdapi/v1/txt2img", {**base, "sampler_name": "DPM++ 2M Karras"}).json()
    b = post(server, "/sdapi/v1/txt2img", {**base, "sampler_name": "DPM++ 2M", "scheduler": "karras"}).json()
    c = post(server, "/sdapi/v1/txt2img", {**base, "sampler_index": "DPM++ 2M Karras", "scheduler": "automatic"}).json()
    assert a["images"] == b["images"] == c["images"]
    plain = post(server, "/sdapi/v1/txt2img", {**base, "sampler_name": "DPM++ 2M", "scheduler": "Automatic"}).json()
    assert plain["images"] != a["images"]


def test_img2img_and_inpaint_equal_the_python_api(server):
    import sdrt

    pipe = sdrt.Pipeline.load()
    init = pipe.txt2img("a large yellow square on a green background", steps=4, seed=1)[0]
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    common = {"prompt": PROMPT, "steps": 8, "seed": 9, "cfg_scale": 7.5, "sampler_name": "Euler"}
    r = post(server, "/sdapi/v1/img2img", {**common, "init_images": [b64_png(init)], "denoising_strength": 0.6})
    want = pipe.img2img(init, PROMPT, strength=0.6, steps=8, seed=9, guidance=7.5, sampler="euler")[0]
    assert np.abs(pixels(decoded(r.json()["images"][0])) - pixels(want)).max() == 0
    r = post(server, "/sdapi/v1/img2img", {**common, "init_images": ["data:image/png;base64," + b64_png(init)],
                                           "mask": "data:image/png;base64," + b64_png(mask), "inpainting_fill": 1,
                                           "inpaint_full_res": False, "mask_blur": 2, "denoising_strength": 0.9})
    want = pipe.inpaint(init, mask, PROMPT, strength=0.9, mask_blur=2, steps=8, seed=9, guidance=7.5,
                        sampler="euler")[0]
    got = decoded(r.json()["images"][0])
    assert np.abs(pixels(got) - pixels(want)).max() == 0
    outside = np.ones(mask.size[::-1], bool)
    outside[8:56, 8:56] = False  # the mask and its blur (a Gaussian of radius 2 reaches 5 pixels out)
    assert (pixels(got)[outside] == pixels(init)[outside]).all()  # unmasked pixels are the input's
    inverted = post(server, "/sdapi/v1/img2img", {**common, "init_images": [b64_png(init)], "mask": b64_png(mask),
                                                  "inpainting_mask_invert": 1, "inpainting_fill": 1, "mask_blur": 0,
                                                  "inpaint_full_res": False}).json()["images"][0]
    inside = np.zeros(mask.size[::-1], bool)
    inside[24:40, 24:40] = True
    assert (pixels(decoded(inverted))[inside] == pixels(init)[inside]).all()


def _error(r):
    return r.status_code, r.json()


@pytest.mark.parametrize("path, body, status, detail", [
    ("/sdapi/v1/txt2img", {"width": 63}, 400, "width must be a positive multiple of 8, got 63; use 56 or 64"),
    ("/sdapi/v1/txt2img", {"steps": -5}, 400, "steps must be a whole number from 1 to 1000, got -5"),
    ("/sdapi/v1/txt2img", {"prompt": "x" * 20_000}, 400,
     "prompt has 20000 characters; this server takes at most 8192 (sdrt serve --max-prompt-chars N)"),
    ("/sdapi/v1/txt2img", {"sampler_name": "Euler Bogus"}, 400,
     "unknown sampler 'Euler Bogus'; known samplers: DDIM, PLMS, LMS, LMS Karras, Euler, Euler a, Heun, DPM++ 2M, "
     "DPM++ 2M Karras, DPM++ 2M SDE Karras, UniPC, LCM"),
    ("/sdapi/v1/txt2img", {"sampler_name": "Euler", "scheduler": "Karras"}, 400,
     "unknown sampler 'Euler with the Karras schedule'; known samplers: DDIM, PLMS, LMS, LMS Karras, Euler, "
     "Euler a, Heun, DPM++ 2M, DPM++ 2M Karras, DPM++ 2M SDE Karras, UniPC, LCM"),
    ("/sdapi/v1/txt2img", {"scheduler": "exponential"}, 400,
     "unknown scheduler 'exponential'; sdrt has: Automatic (the sampler as named), Karras (for LMS Karras, "
     "DPM++ 2M Karras, DPM++ 2M SDE Karras)"),
    ("/sdapi/v1/txt2img", {"enable_hr": True}, 400, "enable_hr (hires fix) is not supported by sdrt serve yet; "
     "send enable_hr: false and the final width/height"),
    ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, 400,
     "model '../../etc/passwd' is not served here; served: sdrt-embedded [95fdc8280c] (sdrt serve --model BUNDLE "
     "adds one)"),
    ("/sdapi/v1/txt2img", {"script_name": "x/y/z plot"}, 422, "Script 'x/y/z plot' not found"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"ADetailer": {"args": []}}}, 422,
     "always on script ADetailer not found"),
    ("/sdapi/v1/txt2img", {"prompt": "<lora:../../secret:1>"}, 400,
     "LoRA '../../secret' from the prompt was not found as ../../secret.safetensors in no folder (pass --lora-dir)"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 404,
     "Init image not found: send init_images as a list of base64-encoded images"),
    ("/sdapi/v1/img2img", {"init_images": ["not base64!"]}, 400, "init_images[0] is not valid base64; send the "
     "image's bytes base64-encoded (PNG, JPEG or WebP), optionally as a data:image/png;base64,... URI"),
    ("/sdapi/v1/img2img", {"init_images": ["aGVsbG8gd29ybGQ="]}, 400, "init_images[0] decodes from base64 to 11 "
     "bytes that are not a readable image (no image format recognised); send a PNG, JPEG or WebP"),
    ("/sdapi/v1/img2img", {"init_images": [b64_png(Image.new("RGB", (64, 64)))], "mask": b64_png(Image.new("L", (32, 64)))},
     400, "mask is 32x64 but init_images[0] is 64x64; send a mask of the image's size"),
    ("/sdapi/v1/img2img", {"init_images": [b64_png(Image.new("RGB", (64, 64)))], "resize_mode": 7}, 400,
     "resize_mode must be one of {0: 'just resize', 1: 'crop and resize', 2: 'resize and fill', 3: 'latent upscale "
     "(as 0)'}, got 7"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "nope"}, 400,
     "model 'nope' is not served here; served: sdrt-embedded [95fdc8280c] (sdrt serve --model BUNDLE adds one)"),
    ("/sdrt/v1/jobs/nope", None, 404, "no job with id 'nope' (finished jobs are kept for the last 1000)"),
])
def test_bad_input_is_a_4xx_in_a1111_shape(server, path, body, status, detail):
    r = post(server, path, {"steps": 2, **body}) if body is not None else requests.get(server.base + path, timeout=10)
    code, payload = _error(r)
    assert code == status, payload
    assert payload["detail"] == detail and payload["errors"] == f"{status}: {detail}"
    assert set(payload) == {"error", "detail", "body", "errors"}


def test_validation_errors_keep_fastapi_422(server):
    for body in ({"cfg_scale": "high"}, {"steps": "many"}, {"prompt": ["a", "b"]}):
        r = post(server, "/sdapi/v1/txt2img", body)
        assert r.status_code == 422
        field = next(iter(body))
        assert r.json()["detail"][0]["loc"] == ["body", field]
    r = requests.post(server.base + "/sdapi/v1/txt2img", data=b"{not json", timeout=10,
                      headers={"content-type": "application/json"})
    assert r.status_code == 422 and "detail" in r.json()


def test_lists_clients_probe(server):
    get = lambda p: requests.get(server.base + "/sdapi/v1/" + p, timeout=10)  # noqa: E731
    assert {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in get("samplers").json()
    assert [s["name"] for s in get("schedulers").json()] == ["automatic", "karras"]
    assert get("scripts").json() == {"txt2img": [], "img2img": []}
    models = get("sd-models").json()
    assert models == [{"title": "sdrt-embedded [95fdc8280c]", "model_name": "sdrt-embedded", "hash": "95fdc8280c",
                       "sha256": models[0]["sha256"], "filename": "sdrt-embedded", "config": None}]
    for path, want in (("loras", []), ("hypernetworks", []), ("sd-vae", []), ("prompt-styles", []),
                       ("embeddings", {"loaded": {}, "skipped": {}})):
        assert get(path).json() == want
    assert get("upscalers").json()[0]["name"] == "None"
    assert get("progress").json()["state"]["job_count"] == 0
    assert "x-process-time" in get("options").headers
    for path in ("refresh-checkpoints", "refresh-loras"):
        assert post(server, "/sdapi/v1/" + path, {}).json() is None


def test_openapi_schema_is_valid(server):
    from openapi_spec_validator import validate

    schema = requests.get(server.base + "/openapi.json", timeout=10).json()
    validate(schema)
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdrt/v1/jobs/{job_id}"} <= set(schema["paths"])


def test_models_switch_globally_and_per_request(bundles):
    with running_server([None, bundles["sd1"]], Settings(batch_window_s=0.0)) as s:
        titles = [m["title"] for m in requests.get(s.base + "/sdapi/v1/sd-models", timeout=10).json()]
        assert titles[0].startswith("sdrt-embedded [") and titles[1].startswith("sd1 [")
        body = {"prompt": "a cat", "steps": 2, "seed": 1}
        first = json.loads(post(s, "/sdapi/v1/txt2img", body).json()["info"])
        assert first["sd_model_name"] == "sdrt-embedded"
        once = json.loads(post(s, "/sdapi/v1/txt2img", {**body, "override_settings": {"sd_model_checkpoint": "sd1"}})
                          .json()["info"])
        from sdrt.runtime.manifest import load_manifest

        m = load_manifest(bundles["sd1"])
        assert once["sd_model_name"] == "sd1" and once["sd_model_hash"] == m.model_hash
        assert requests.get(s.base + "/sdapi/v1/options", timeout=10).json()["sd_model_checkpoint"] == titles[0]
        assert post(s, "/sdapi/v1/options", {"sd_model_checkpoint": titles[1], "CLIP_stop_at_last_layers": 2}).json() is None
        options = requests.get(s.base + "/sdapi/v1/options", timeout=10).json()
        assert options["sd_model_checkpoint"] == titles[1] and options["CLIP_stop_at_last_layers"] == 2
        now = json.loads(post(s, "/sdapi/v1/txt2img", body).json()["info"])
        assert now["sd_model_name"] == "sd1" and now["clip_skip"] == 2 and "Clip skip: 2" in now["infotexts"][0]


def test_auth_basic_and_bearer():
    import base64

    with running_server(access=Access(users=(("ann", "s3cret"),), keys=("abc",))) as s:
        url = s.base + "/sdapi/v1/options"
        r = requests.get(url, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
        assert r.json() == {"error": "HTTPException", "detail": "Not authenticated", "body": "",
                            "errors": "401: Not authenticated"}
        assert requests.get(url, auth=("ann", "wrong"), timeout=10).json()["detail"] == "Incorrect username or password"
        assert requests.get(url, auth=("ann", "s3cret"), timeout=10).status_code == 200
        assert requests.get(url, headers={"Authorization": "Bearer abc"}, timeout=10).status_code == 200
        assert requests.get(url, headers={"Authorization": "Bearer abd"}, timeout=10).status_code == 401
        junk = "Basic " + base64.b64encode(b"\xff\xfe").decode()
        assert requests.get(url, headers={"Authorization": junk}, timeout=10).status_code == 401
        assert requests.get(s.base + "/sdapi/v1/loras", timeout=10).status_code == 401  # (A1111 leaves it open)


def test_body_over_the_limit_is_a_413():
    with running_server(access=Access(max_body_bytes=2**20)) as s:
        big = {"prompt": "x", "init_images": ["A" * (2 * 2**20)]}
        r = post(s, "/sdapi/v1/img2img", big)
        assert r.status_code == 413
        sent = len(json.dumps(big))
        detail = f"the request body is over 1048576 bytes ({sent} or more); sdrt serve --max-body-mb raises the limit"
        assert r.json() == {"error": "HTTPException", "detail": detail, "body": "", "errors": f"413: {detail}"}

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(3):
                yield b" " * 2**19
        r = requests.post(s.base + "/sdapi/v1/img2img", data=chunks(), timeout=30,
                          headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "HTTPException"
