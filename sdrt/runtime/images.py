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
