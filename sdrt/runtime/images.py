"""Decoded arrays -> PIL images, and PNGs that other Stable Diffusion tools read back.

The `parameters` text chunk follows AUTOMATIC1111's layout (prompt line, "Negative prompt:" line, then
"Key: value, ..."), which A1111, ComfyUI importers, InvokeAI and civitai parse.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import OutputNotWritable
from .fsutil import check_writable, fsync_dir, write_temp_beside


def to_pil(decoded: np.ndarray) -> list[Image.Image]:
    """VAE output (B, 3, H, W) in [-1, 1] -> RGB images, rounded as diffusers' numpy_to_pil does."""
    x = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)  # (B, H, W, 3)
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in x]


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def png_bytes(image: Image.Image) -> bytes:
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def output_paths(out: Path, count: int) -> list[Path]:
    """One image: `out` itself. Several: out-0.png, out-1.png, ... beside it."""
    out = check_writable(out)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_all(images: list[Image.Image], paths: list[Path]) -> None:
    """Write every image to a temp file first and rename them into place only when all are written,
    so an interrupted or failed run leaves no partial image and no partial set."""
    temps: list[Path] = []
    try:
        for image, path in zip(images, paths):
            temps.append(write_temp_beside(path, png_bytes(image)))
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
        for parent in {p.parent for p in paths}:
            fsync_dir(parent)
    except OSError as e:
        raise OutputNotWritable(f"could not write {str(e.filename or paths[0])!r}: {e.strerror or e}; "
                                "choose another --out") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


# -- images coming in ------------------------------------------------------------------------------
def load_image(image, what: str = "image") -> Image.Image:
    """A path, PIL image or (H, W, 3) uint8 array -> RGB, with its EXIF orientation applied (phone photos)."""
    from PIL import ImageOps, UnidentifiedImageError

    from ..errors import InvalidRequest

    if isinstance(image, (str, Path)):
        try:
            with Image.open(Path(image).expanduser()) as opened:
                image = ImageOps.exif_transpose(opened)
                image.load()
        except FileNotFoundError:
            raise InvalidRequest(f"{what} file {str(image)!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidRequest(f"{what} file {str(image)!r} is not a readable image ({e})") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InvalidRequest(f"{what} array must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
    else:
        raise InvalidRequest(f"{what} must be a file path, a PIL image or a uint8 array, got {type(image).__name__}")
    return image


def as_rgb(image: Image.Image) -> Image.Image:
    """Explicit conversion: transparent pixels become white (not black), as image editors show them."""
    if image.mode in ("RGBA", "LA", "P") and "A" in image.convert("RGBA").getbands():
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def as_mask(image: Image.Image) -> Image.Image:
    """White = repaint. An RGBA mask with transparency uses its alpha (strokes painted on a transparent layer);
    anything else its luminance."""
    if image.mode in ("RGBA", "LA"):
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image.convert("L")


def to_array(image: Image.Image) -> np.ndarray:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess."""
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return (x.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def mask_array(mask: Image.Image) -> np.ndarray:
    """L image -> (1, 1, H, W) float32 of 0 and 1 (binarized at 0.5, as diffusers' mask processor)."""
    m = np.asarray(mask, dtype=np.float32) / 255.0
    return (m >= 0.5).astype(np.float32)[None, None]


def nearest_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C, h, w), torch.nn.functional.interpolate's default 'nearest' (floor of i * H / h)."""
    rows = np.floor(np.arange(h) * (x.shape[2] / h)).astype(np.int64)
    cols = np.floor(np.arange(w) * (x.shape[3] / w)).astype(np.int64)
    return x[:, :, rows][:, :, :, cols]
