"""A1111 request bodies -> sdrt jobs (Work), and finished jobs -> A1111 responses."""
from __future__ import annotations

from dataclasses import replace

from PIL import Image, ImageOps, ImageStat

from ..errors import InvalidRequest, NotFound
from ..runtime import hypernetworks, lora, request
from ..runtime.images import as_mask, as_rgb, png_bytes
from ..runtime.samplers import resolve
from . import a1111
from .controlnet_units import units
from .jobs import Job, Work
from .schema import Generation, Img2Img, Txt2Img

RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "latent upscale (as 0)"}
FILLS = {0: "fill", 1: "original", 2: "latent noise (as original)", 3: "latent nothing (as original)"}


def txt2img_work(body: Txt2Img, service, max_prompt_chars: int) -> Work:
    _refuse_unsupported(body)
    if body.enable_hr:
        raise InvalidRequest("enable_hr (hires fix) is not supported by sdrt serve yet; send enable_hr: false and "
                             "the final width/height")
    work = _common(body, service, "txt2img", max_prompt_chars)
    found = units(body.alwayson_scripts, service.models.nets)
    if found:  # ControlNet jobs run alone
        return replace(work, mode_args={"units": found})
    o = work.options
    key = (work.model, o["height"], o["width"], o["steps"], o["sampler"], o["eta"], o["guidance"] > 1.0,
           o["clip_skip"], tuple(lora.parse_tags(work.prompt)[1]), tuple(hypernetworks.parse_tags(work.prompt)))
    return replace(work, batch_key=key)


def img2img_work(body: Img2Img, service, max_prompt_chars: int) -> Work:
    _refuse_unsupported(body)
    if not body.init_images:
        raise NotFound("Init image not found: send init_images as a list of base64-encoded images")
    image = init = as_rgb(a1111.decode_image(body.init_images[0], "init_images[0]"))
    mask = None
    if body.mask is not None:
        mask = as_mask(a1111.decode_image(body.mask, "mask"))
        if mask.size != image.size:
            raise InvalidRequest(f"mask is {mask.size[0]}x{mask.size[1]} but init_images[0] is {image.size[0]}x"
                                 f"{image.size[1]}; send a mask of the image's size")
        if body.inpainting_mask_invert not in (0, 1):
            raise InvalidRequest(f"inpainting_mask_invert must be 0 or 1, got {body.inpainting_mask_invert}")
        mask = ImageOps.invert(mask) if body.inpainting_mask_invert else mask
    work = _common(body, service, "inpaint" if mask is not None else "img2img", max_prompt_chars)
    size = (work.options["width"], work.options["height"])
    image, mask = _resized(image, mask, body.resize_mode, size)
    args = {"strength": body.denoising_strength}
    if mask is not None:
        if body.inpainting_fill not in FILLS:
            raise InvalidRequest(f"inpainting_fill must be one of {FILLS}, got {body.inpainting_fill}")
        if body.inpainting_fill == 0:
            image = _filled(image, mask)
        blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
        args |= {"mask_blur": blur, "only_masked": body.inpaint_full_res, "padding": body.inpaint_full_res_padding}
    found = units(body.alwayson_scripts, service.models.nets, init_image=init)  # as sent, before any fill
    return replace(work, mode_args={"image": image, "mask": mask, "args": args, "units": found})


def response(body: Generation, job: Job, service) -> dict:
    images = job.take_images()
    served = service.models.find(job.work.model)
    o = job.work.options
    infotexts = [im.info.get("parameters", "") for im in images]
    seeds = [s for part in range(job.work.n_iter) for s in job.seeds_of(part)][: len(images)]
    width, height = images[0].size if images else (o["width"], o["height"])
    info = a1111.info_json(body, seeds=seeds, infotexts=infotexts, width=width, height=height,
                           sampler=resolve(o["sampler"]).label, model=served.name, model_hash=served.hash,
                           clip_skip=o["clip_skip"], job_id=job.id,
                           denoising_strength=getattr(body, "denoising_strength", None),
                           inpainting=job.work.mode == "inpaint")
    encoded = [a1111.encode_png(png_bytes(im)) for im in images] if body.send_images else []
    return {"images": encoded, "parameters": a1111.parameters_echo(body), "info": info}


def _common(body: Generation, service, mode: str, max_prompt_chars: int) -> Work:
    for text, what in ((body.prompt, "prompt"), (body.negative_prompt, "negative_prompt")):
        if len(text) > max_prompt_chars:
            raise InvalidRequest(f"{what} has {len(text)} characters; this server takes at most {max_prompt_chars} "
                                 "(sdrt serve --max-prompt-chars N)")
    overrides = body.override_settings or {}
    current, server_options = service.chosen()
    wanted = overrides.get("sd_model_checkpoint")
    served = service.models.find(wanted) if wanted else current
    manifest_f = 8  # every SD family's VAE scale factor; the pipeline checks the rest
    width = None if body.width is None else request.check_size(body.width, "width", manifest_f)
    height = None if body.height is None else request.check_size(body.height, "height", manifest_f)
    sampler = a1111.sampler_for(body.sampler_name, body.sampler_index, body.scheduler)
    clip_skip = overrides.get("CLIP_stop_at_last_layers", server_options.get("CLIP_stop_at_last_layers", 1))
    batch_size = request.check_int(body.batch_size, "batch_size", 1, request.MAX_BATCH)
    n_iter = request.check_int(body.n_iter, "n_iter", 1, 100)
    size = (served.width, served.height)
    options = {"negative_prompt": body.negative_prompt, "steps": request.check_int(body.steps, "steps", 1, 1000),
               "guidance": request.check_guidance(body.cfg_scale), "sampler": sampler,
               "eta": body.eta if resolve(sampler).takes_eta else None, "clip_skip": clip_skip,
               "width": width or size[0], "height": height or size[1]}
    if mode != "txt2img" and (width is None or height is None):
        options["width"], options["height"] = width, height  # img2img: the image's own size
    return Work(mode=mode, model=served.name, prompt=body.prompt, options=options, seed=a1111.seed_of(body.seed),
                batch_size=batch_size, n_iter=n_iter)


def _refuse_unsupported(body: Generation) -> None:
    refused = {"subseed_strength": body.subseed_strength != 0, "restore_faces": body.restore_faces,
               "tiling": body.tiling, "styles": bool(body.styles), "refiner_checkpoint": bool(body.refiner_checkpoint)}
    named = [k for k, on in refused.items() if on]
    if named:
        raise InvalidRequest(f"{', '.join(named)}: not supported by sdrt serve (no variation seeds, face "
                             "restoration, tiling, prompt styles or refiner yet); leave them at their defaults")


def _resized(image: Image.Image, mask, mode: int, size) -> tuple:
    """A1111's resize_mode for the init image and its mask: to the requested size (None: kept as sent)."""
    if mode not in RESIZE_MODES:
        raise InvalidRequest(f"resize_mode must be one of {RESIZE_MODES}, got {mode}")
    w, h = size
    if w is None or h is None or (w, h) == image.size:
        return image, mask
    if mode in (0, 3):
        fit = lambda im: im.resize((w, h), Image.LANCZOS)  # noqa: E731
    elif mode == 1:
        fit = lambda im: ImageOps.fit(im, (w, h), Image.LANCZOS)  # noqa: E731
    else:
        def fit(im):  # the image whole, centred on a stretched copy of itself (A1111 fills with its edges)
            out = im.resize((w, h), Image.LANCZOS)
            inner = ImageOps.contain(im, (w, h), Image.LANCZOS)
            out.paste(inner, ((w - inner.size[0]) // 2, (h - inner.size[1]) // 2))
            return out
    return fit(image), None if mask is None else fit(mask)


def _filled(image: Image.Image, mask: Image.Image) -> Image.Image:
    """inpainting_fill 0: the masked area pre-filled with the mean colour of the rest (A1111 blurs it outward)."""
    keep = mask.point(lambda v: 255 if v < 128 else 0)
    if keep.getbbox() is None:
        return image
    mean = tuple(round(c) for c in ImageStat.Stat(image, keep).mean)
    return Image.composite(image, Image.new("RGB", image.size, mean), keep)

