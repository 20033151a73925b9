"""Image-conditioned generation: img2img, inpainting, outpainting, depth2img. Each is a short path into the same loop
(`Pipeline._denoise`): it prepares the starting latents, any extra U-Net channels, and what to keep.

References: diffusers' StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline and
StableDiffusionDepth2ImgPipeline (the arithmetic and
the order of random draws: image latents, noise, masked-image latents), AUTOMATIC1111's img2img for mask
blur, "only masked" and the final paste that leaves unmasked pixels untouched.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from ..errors import InvalidRequest
from . import images as im
from . import names
from .controlnet import Control
from .depth import depth_condition, dpt_pixels, load_depth

FILLS = ("edge", "noise")


class ImageModes:
    """Mixed into Pipeline: uses its _job, _denoise, _conditioning, decode, _images and engines."""

    def img2img(self, image, prompt: str, strength: float = 0.75, resize: bool = False, progress=None, **options):
        """Rework `image` (path, PIL or uint8 array): VAE-encode it, noise it to the step `strength` selects
        (1 = pure noise), denoise the rest. Takes txt2img's options; height/width default to the image's."""
        img, _, options = self._sized(im.as_rgb(im.load_image(image)), None, options, resize)
        job = self._job(prompt, **options)
        self._require_unet(self.manifest.latent_channels, "img2img")
        start = self._start(job, strength)
        x0 = self.encode_image(im.to_array(img), job)  # (B, 4, h, w)
        x = job.solver.add_noise(x0, job.noise.standard_normal(job.latent_shape), start)
        x = self._denoise(x, self._conditioning(job), job, start, progress)
        return self._images(self.decode(x), job, **{"Denoising strength": strength})

    def inpaint(self, image, mask, prompt: str, strength: float = 1.0, mask_blur: int = 4, only_masked: bool = False,
                padding: int = 32, resize: bool = False, progress=None, **options):
        """Repaint where `mask` is white (grayscale, or RGBA's alpha). Inpainting models (9-channel U-Net) see
        the mask and the masked image; ordinary models get the known region blended back every step.
        `only_masked` works on a padded crop around the mask at the full generation size and pastes it back.
        Pixels outside the (blurred) mask are the input's, exactly."""
        img, msk = im.as_rgb(im.load_image(image)), im.as_mask(im.load_image(mask, "mask"))
        if msk.size != img.size:
            raise InvalidRequest(f"mask is {msk.size[0]}x{msk.size[1]} but the image is {img.size[0]}x"
                                 f"{img.size[1]}; give a mask of the image's size")
        blur = _check_int(mask_blur, "mask_blur", 0, 64)
        if only_masked:
            return self._inpaint_crop(img, msk, prompt, strength, blur, _check_int(padding, "padding", 0, 1024),
                                      progress, options)
        img, msk, options = self._sized(img, msk, options, resize)
        job = self._job(prompt, **options)
        decoded = self._inpaint_latents(img, msk, job, strength, progress)
        keep = _blurred(msk, blur)
        return self._images(decoded, job, paste=lambda out: [Image.composite(g, img, keep) for g in out],
                            **{"Denoising strength": strength, "Mask blur": blur})

    def outpaint(self, image, prompt: str, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                 fill: str = "edge", mask_blur: int = 4, progress=None, **options):
        """Extend the canvas by the given pixels (multiples of 8), pre-fill the new area (`fill`: "edge"
        repeats the border, "noise" random pixels), and inpaint it. The original pixels stay as they were."""
        img = im.as_rgb(im.load_image(image))
        sides = {k: _check_int(v, k, 0, 4096) for k, v in
                 (("left", left), ("right", right), ("top", top), ("bottom", bottom))}
        if any(v % 8 for v in sides.values()) or not any(sides.values()):
            raise InvalidRequest(f"outpaint sides must be multiples of 8 and at least one above 0, got {sides}")
        if fill not in FILLS:
            raise InvalidRequest(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
        canvas, hard = _extend(img, sides, fill, options.get("seed"))
        canvas, hard, options = self._sized(canvas, hard, options, resize=False)
        job = self._job(prompt, **options)
        decoded = self._inpaint_latents(canvas, hard, job, 1.0, progress)
        keep = Image.fromarray(np.minimum(np.asarray(_blurred(hard, _check_int(mask_blur, "mask_blur", 0, 64))),
                                          np.asarray(hard)))  # the blur may soften the seam, never the original
        return self._images(decoded, job, paste=lambda out: [Image.composite(g, canvas, keep) for g in out],
                            **{"Outpaint": ", ".join(f"{k} {v}" for k, v in sides.items() if v)})

    def depth2img(self, image, prompt: str, depth=None, strength: float = 0.8, resize: bool = False,
                  progress=None, **options):
        """img2img that keeps `image`'s depth layout, for depth models (5-channel U-Net: latents + depth).
        `depth`: a map of any size (16-bit PNG, PNG, .npy or array; larger = farther or nearer, only the
        order matters after scaling to [-1, 1]); None estimates it with the bundle's depth estimator."""
        img, _, options = self._sized(im.as_rgb(im.load_image(image)), None, options, resize)
        job = self._job(prompt, **options)
        self._require_unet(self.manifest.latent_channels + 1, "depth2img")
        source = "given" if depth is not None else "estimated"
        d = load_depth(depth) if depth is not None else self.estimate_depth(img)
        cond = np.repeat(depth_condition(d, *job.latent_shape[2:]), job.batch, axis=0)  # (B, 1, h, w)
        start = self._start(job, strength)
        x0 = self.encode_image(im.to_array(img), job)
        x = job.solver.add_noise(x0, job.noise.standard_normal(job.latent_shape), start)
        x = self._denoise(x, self._conditioning(job), job, start, progress, extra=cond)
        return self._images(self.decode(x), job, **{"Denoising strength": strength, "Depth": source})

    def estimate_depth(self, image: Image.Image) -> np.ndarray:
        """(H', W') relative depth from the bundle's DPT depth estimator (its 384x384 input)."""
        if names.DEPTH_ESTIMATOR not in self.manifest.graphs:
            raise InvalidRequest("this bundle has no depth estimator (its source folder had none): pass a depth "
                                 "map (depth=... / --depth FILE)")
        out = self._engine(names.DEPTH_ESTIMATOR)(**{names.PIXEL_VALUES: dpt_pixels(image)})
        return out[names.PREDICTED_DEPTH][0].astype(np.float32)

    def _depth_map(self, image: Image.Image) -> np.ndarray:
        """A ControlNet's "depth" preprocessor: this bundle's estimator, or a typed error naming what to do."""
        if names.DEPTH_ESTIMATOR not in self.manifest.graphs:
            raise InvalidRequest("the depth preprocessor runs the model bundle's depth estimator, and this bundle has "
                                 "none (only SD 2 depth models carry one): give a depth map as the control image")
        return self.estimate_depth(image)

    # -- shared pieces ------------------------------------------------------------------------------
    def encode_image(self, pixels: np.ndarray, job) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) latents: the encoder's distribution, sampled once per
        image of the batch with that image's generator, times the VAE scaling factor."""
        params = self._engine(names.VAE_ENCODER)(**{names.SAMPLE: pixels})[names.LATENT_PARAMETERS]
        mean, logvar = np.split(params.astype(np.float32), 2, axis=1)  # (1, 4, h, w) each
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
        z = job.noise.standard_normal((job.batch, *mean.shape[1:]))
        return ((mean + std * z) * np.float32(self.manifest.vae_scaling_factor)).astype(np.float32)

    def _inpaint_latents(self, img: Image.Image, msk: Image.Image, job, strength: float, progress) -> np.ndarray:
        channels, latent = self.manifest.unet_in_channels, self.manifest.latent_channels
        if channels not in (latent, 2 * latent + 1):
            self._require_unet(2 * latent + 1, "inpainting")
        start = self._start(job, strength)
        pixels, mask = im.to_array(img), im.mask_array(msk)  # (1, 3, H, W), (1, 1, H, W)
        h, w = job.latent_shape[2:]
        m = np.repeat(im.nearest_resize(mask, h, w), job.batch, axis=0)  # (B, 1, h, w)
        full = start == 0 and strength >= 1.0  # pure noise: the image enters only through the mask channels
        x0 = None if full and channels != latent else self.encode_image(pixels, job)
        noise = job.noise.standard_normal(job.latent_shape)
        x = noise * np.float32(job.solver.init_noise_sigma) if full else job.solver.add_noise(x0, noise, start)
        cond = self._conditioning(job)
        if channels != latent:  # an inpainting model: [latents, mask, masked-image latents]
            masked = self.encode_image(pixels * (mask < 0.5), job)
            x = self._denoise(x, cond, job, start, progress, extra=np.concatenate([m, masked], axis=1))
        else:  # an ordinary model: put the known region back after every step, noised to the next one
            last = len(job.solver.timesteps) - 1

            def blend(x, i):
                known = x0 if i == last else job.solver.add_noise(x0, noise, i + 1)
                return (1 - m) * known + m * x

            x = self._denoise(x, cond, job, start, progress, blend=blend)
        return self.decode(x)

    def _inpaint_crop(self, img, msk, prompt, strength, blur, padding, progress, options):
        """AUTOMATIC1111's "only masked": inpaint a padded box around the mask at the generation size, then
        scale it back and paste it in."""
        box = _crop_box(msk, padding, options, self.manifest, img.size)
        size = (options.get("width") or self.manifest.default_width, options.get("height") or self.manifest.default_height)
        crop_img = img.crop(box).resize(size, Image.LANCZOS)
        crop_msk = msk.crop(box).resize(size, Image.LANCZOS)
        job = self._job(prompt, **{**options, "width": size[0], "height": size[1],
                                   "controls": _cropped(options.get("controls"), img.size, box)})
        decoded = self._inpaint_latents(crop_img, crop_msk, job, strength, progress)
        keep = _blurred(msk, blur)

        def paste(out):
            pasted = []
            for g in out:
                whole = img.copy()
                whole.paste(g.resize((box[2] - box[0], box[3] - box[1]), Image.LANCZOS), box[:2])
                pasted.append(Image.composite(whole, img, keep))
            return pasted

        return self._images(decoded, job, paste=paste, **{"Denoising strength": strength, "Mask blur": blur,
                                                          "Inpaint area": "Only masked", "Masked area padding": padding})

    def _sized(self, img, msk, options: dict, resize: bool):
        """The generation size is the image's unless height/width say otherwise; sides must be multiples
        of 8, or `resize` scales the image (and mask) to the requested (or nearest smaller valid) size."""
        f = self.manifest.vae_scale_factor
        w, h = options.get("width") or img.size[0], options.get("height") or img.size[1]
        if not resize:
            if (w, h) != img.size:
                raise InvalidRequest(f"the image is {img.size[0]}x{img.size[1]} but {w}x{h} was asked for; give an "
                                     "image of that size, or pass resize=True (--resize) to scale it")
            if w % f or h % f:
                raise InvalidRequest(f"the image is {w}x{h}; its sides must be multiples of {f}: use "
                                     f"{max(f, w // f * f)}x{max(f, h // f * f)}, or pass resize=True (--resize)")
        size = (max(f, w // f * f), max(f, h // f * f))
        if size != img.size:
            img = img.resize(size, Image.LANCZOS)
            msk = msk.resize(size, Image.LANCZOS) if msk is not None else None
        return img, msk, {**options, "width": size[0], "height": size[1]}

    def _start(self, job, strength) -> int:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise InvalidRequest(f"strength must be a number in (0, 1], got {strength!r}")
        start = job.solver.start_index(strength)
        if start >= len(job.solver.timesteps):
            raise InvalidRequest(f"strength {strength} with {job.steps} steps leaves no step to run "
                                 f"(int(steps x strength) is 0); raise the strength or the steps")
        return start

    def _engine(self, component: str):
        """Open an optional graph (the VAE encoder) on first use."""
        if component not in self.engines:
            graph = self.manifest.graphs.get(component)
            if graph is None:
                raise InvalidRequest(f"this bundle has no {component} graph, which this mode needs; "
                                     "re-export it with `sdrt export`")
            self.engines[component] = self._open(component, graph.path)
        return self.engines[component]


def _check_int(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{what} must be a whole number from {lo} to {hi}, got {value!r}")
    return value


def _cropped(controls, size, box):
    """A ControlNet's image belongs to the whole image: "only masked" gives the net the same crop (as A1111)."""
    if not controls:
        return controls
    controls = [controls] if isinstance(controls, Control) else controls
    return [replace(c, image=im.load_image(c.image, "control image").convert("RGB").resize(size, Image.LANCZOS)
                    .crop(box)) if isinstance(c, Control) else c for c in controls]


def _blurred(mask: Image.Image, radius: int) -> Image.Image:
    hard = mask.point(lambda v: 255 if v >= 128 else 0)
    return hard.filter(ImageFilter.GaussianBlur(radius)) if radius else hard


def _extend(img: Image.Image, sides: dict, fill: str, seed) -> tuple[Image.Image, Image.Image]:
    """The larger canvas (new area pre-filled) and its mask (white = new)."""
    a = np.asarray(img)  # (H, W, 3)
    pad = ((sides["top"], sides["bottom"]), (sides["left"], sides["right"]))
    canvas = np.pad(a, (*pad, (0, 0)), mode="edge")
    mask = np.pad(np.zeros(a.shape[:2], np.uint8), pad, constant_values=255)
    if fill == "noise":
        rng = np.random.default_rng(seed if isinstance(seed, int) and seed >= 0 else None)
        canvas = np.where(mask[..., None] > 0, rng.integers(0, 256, canvas.shape, dtype=np.uint8), canvas)
    return Image.fromarray(canvas), Image.fromarray(mask)


def _crop_box(msk: Image.Image, padding: int, options: dict, manifest, size) -> tuple[int, int, int, int]:
    """The mask's bounding box, padded, grown to the generation size's aspect ratio, kept inside the image."""
    box = msk.point(lambda v: 255 if v >= 128 else 0).getbbox()
    if box is None:
        raise InvalidRequest("the mask is empty (no white pixels): nothing to repaint")
    x0, y0, x1, y1 = box[0] - padding, box[1] - padding, box[2] + padding, box[3] + padding
    target = (options.get("width") or manifest.default_width) / (options.get("height") or manifest.default_height)
    w, h = x1 - x0, y1 - y0
    if w / h < target:  # too tall: widen around the centre
        grow = target * h - w
        x0, x1 = x0 - grow / 2, x1 + grow / 2
    else:
        grow = w / target - h
        y0, y1 = y0 - grow / 2, y1 + grow / 2
    x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
    return x0, y0, min(size[0], int(round(x1))), min(size[1], int(round(y1)))
