"""AUTOMATIC1111's API conventions, turned into sdrt's options and back: samplers and schedule types, seeds,
base64 images, the `info` JSON and infotexts (modules/api/api.py, modules/processing.py Processed.js()).

Where sdrt differs on purpose, the difference is named here: an unknown sampler is a 400 listing the known ones
(A1111 falls back to Euler silently), and an unreadable image is a 400 (A1111: a 500).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import time

from PIL import Image, UnidentifiedImageError

from .. import __version__
from ..errors import InvalidRequest, UnknownSampler
from ..runtime import samplers

SEED_RANGE = 4294967294  # A1111 draws a random seed from [0, 4294967294)
# Schedule types sdrt has (A1111's modules/sd_schedulers.py lists more); "automatic": the sampler as named.
SCHEDULERS = [
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
]


def sampler_for(name: str | None, index: str, scheduler: str | None) -> str:
    """A1111's `sampler_name or sampler_index`, with its scheduler ("DPM++ 2M" + "Karras") or a combined label
    ("DPM++ 2M Karras") -> sdrt's sampler name. Unknown: UnknownSampler (400) with the known labels."""
    label = name or index
    sched = (scheduler or "automatic").strip().lower()
    known = [c.label for c in samplers.SAMPLERS.values()]
    if sched not in ("automatic", "karras"):
        raise InvalidRequest(f"unknown scheduler {scheduler!r}; sdrt has: Automatic (the sampler as named), Karras "
                             f"(for {', '.join(k for k in known if k.endswith(' Karras'))})")
    try:
        cls = samplers.resolve(label)
        if sched == "karras" and not cls.label.endswith("Karras"):
            cls = samplers.resolve(f"{cls.label} Karras")
    except UnknownSampler:
        wanted = label if sched == "automatic" else f"{label} with the Karras schedule"
        raise UnknownSampler(wanted, known) from None
    return cls.name


def seed_of(seed: int) -> int:
    if seed == -1:
        import random
        return random.randrange(SEED_RANGE)
    if seed < 0:
        raise InvalidRequest(f"seed must be -1 (random) or a whole number >= 0, got {seed}")
    return seed


def decode_image(text: str, what: str) -> Image.Image:
    """Raw base64 or a data URI -> a loaded PIL image."""
    if not isinstance(text, str) or not text:
        raise InvalidRequest(f"{what} must be a base64-encoded image (raw or a data: URI), got {text!r:.40}")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64; send the image's bytes base64-encoded (PNG, JPEG or "
                             "WebP), optionally as a data:image/png;base64,... URI") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        reason = "no image format recognised" if isinstance(e, UnidentifiedImageError) else str(e)
        raise InvalidRequest(f"{what} decodes from base64 to {len(raw)} bytes that are not a readable image "
                             f"({reason}); send a PNG, JPEG or WebP") from None
    return image


def encode_png(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def info_json(body, *, seeds: list[int], infotexts: list[str], width: int, height: int, sampler: str,
              model: str, model_hash: str, clip_skip: int, job_id: str, denoising_strength=None,
              inpainting: bool = False) -> str:
    """`info` as A1111's Processed.js() writes it: a JSON string."""
    n = len(seeds)
    return json.dumps({
        "prompt": body.prompt, "all_prompts": [body.prompt] * n,
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * n,
        "seed": seeds[0] if seeds else body.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": width, "height": height, "sampler_name": sampler, "cfg_scale": body.cfg_scale,
        "steps": body.steps, "batch_size": body.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": denoising_strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": infotexts, "styles": body.styles, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": clip_skip, "is_using_inpainting_conditioning": inpainting, "version": f"sdrt {__version__}",
        "job_id": job_id,
    })


def parameters_echo(body) -> dict:
    """The `parameters` of a response: the request as parsed; init images and mask left out (A1111 nulls them
    unless include_init_images)."""
    echo = body.model_dump()
    if not echo.get("include_init_images"):
        for key in ("init_images", "mask"):
            if key in echo:
                echo[key] = None
    return echo


def parse_infotext(text: str) -> dict:
    """An infotext -> {"Prompt", "Negative prompt", "Steps": "20", ...} (the values as written), as A1111's
    png-info answers `parameters`."""
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and ": " in lines[-1] and "," in lines[-1] else ""
    prompt, negative, target = [], [], None
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:"):].strip()
        (negative if target is negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for item in _split_settings(settings):
        key, sep, value = item.partition(":")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def _split_settings(text: str) -> list[str]:
    """Comma-separated "Key: value" pairs; a quoted value may hold commas."""
    items, current, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append(current)
            current = ""
        else:
            current += ch
    return [i for i in (*items, current) if i.strip()]
