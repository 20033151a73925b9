"""Depth maps for depth-guided generation (Stable Diffusion 2 depth: a 5-channel U-Net, latents + depth).

As diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map: the map is resized to the latent size with
torch's bicubic interpolation (align_corners=False, A = -0.75, borders clamped; reproduced here in numpy) and
scaled to [-1, 1] by its own minimum and maximum. A map comes from the user (16-bit PNG, 8-bit PNG or .npy,
any size) or from the bundle's depth estimator (DPT, exported beside the U-Net when the source has one).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InvalidRequest

_A = -0.75  # torch's cubic convolution coefficient


def load_depth(depth) -> np.ndarray:
    """A path (.npy, or an image: 16-bit PNG keeps its precision), PIL image or array -> (H, W) float32."""
    if isinstance(depth, (str, Path)):
        path = Path(depth).expanduser()
        if not path.is_file():
            raise InvalidRequest(f"depth map {str(path)!r} does not exist")
        if path.suffix.lower() == ".npy":
            try:
                depth = np.load(path, allow_pickle=False)
            except ValueError as e:
                raise InvalidRequest(f"depth map {str(path)!r} is not a plain numpy array ({e})") from None
        else:
            try:
                with Image.open(path) as opened:
                    depth = opened.copy()
            except OSError as e:
                raise InvalidRequest(f"depth map {str(path)!r} is not a readable image ({e})") from None
    if isinstance(depth, Image.Image):
        depth = np.asarray(depth if depth.mode in ("I", "I;16", "I;16B", "F", "L") else depth.convert("L"))
    d = np.asarray(depth, dtype=np.float32)
    d = d[0] if d.ndim == 3 and d.shape[0] == 1 else d
    if d.ndim != 2 or min(d.shape) < 2:
        raise InvalidRequest(f"depth map must be 2-D (H, W), got shape {d.shape}")
    if not np.isfinite(d).all():
        raise InvalidRequest("depth map contains NaN or Inf")
    if d.max() == d.min():
        raise InvalidRequest("depth map is flat (one value everywhere): it carries no depth")
    return d


def bicubic_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """(..., H, W) -> (..., h, w) as torch.nn.functional.interpolate(mode="bicubic", align_corners=False)."""
    return _resize_axis(_resize_axis(x, h, axis=-2), w, axis=-1)


def _resize_axis(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    size = x.shape[axis]
    src = (np.arange(out, dtype=np.float64) + 0.5) * (size / out) - 0.5
    base = np.floor(src).astype(np.int64)
    t = (src - base).astype(np.float32)
    weights = [((_A * (t + 1) - 5 * _A) * (t + 1) + 8 * _A) * (t + 1) - 4 * _A,
               ((_A + 2) * t - (_A + 3)) * t * t + 1,
               ((_A + 2) * (1 - t) - (_A + 3)) * (1 - t) * (1 - t) + 1,
               ((_A * (2 - t) - 5 * _A) * (2 - t) + 8 * _A) * (2 - t) - 4 * _A]
    moved = np.moveaxis(x, axis, -1)
    total = sum(moved[..., np.clip(base + k - 1, 0, size - 1)] * wk for k, wk in enumerate(weights))
    return np.moveaxis(total.astype(np.float32), -1, axis)


def depth_condition(depth: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W) depth -> (1, 1, h, w) in [-1, 1]: the U-Net's fifth input channel."""
    d = bicubic_resize(depth[None, None].astype(np.float32), h, w)
    lo, hi = d.min(), d.max()
    return (2.0 * (d - lo) / (hi - lo) - 1.0).astype(np.float32)


def dpt_pixels(image: Image.Image, size: tuple[int, int] = (384, 384)) -> np.ndarray:
    """DPTImageProcessor's defaults for SD 2 depth: bicubic resize to 384x384, [0, 1], mean 0.5, std 0.5."""
    x = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)  # (1, 3, 384, 384)
