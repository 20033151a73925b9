"""ControlNet preprocessors that need no learned model: what turns a picture into a control map.

- canny: OpenCV's Canny edge detector on the RGB image (thresholds 100 and 200 by default), one channel spread
  to three: what A1111's sd-webui-controlnet computes (`cv2.Canny(img, thr_a, thr_b)` then HWC3). OpenCV comes with
  the `controlnet` extra (the same opencv-python the watermark extra brings).
- invert: 255 - pixels, for white-background line art and scribbles (the nets expect white lines on black).
- depth: the base bundle's own DPT depth estimator (SD 2 depth bundles carry one), nearer = brighter, scaled to
  0-255 as A1111's midas preprocessor does (the pipeline passes it in: it runs one of the bundle's graphs).

Anything else (pose skeletons, segmentation, other depth models) needs its own model: give its output as the image.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import InvalidRequest, MissingDependency

PREPROCESSORS = ("canny", "invert", "depth")


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """White edges on black, RGB."""
    for value, what in ((low, "canny low threshold"), (high, "canny high threshold")):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
            raise InvalidRequest(f"{what} must be a whole number from 0 to 1000, got {value!r}")
    try:
        import cv2
    except ImportError:
        raise MissingDependency("the canny preprocessor needs OpenCV: pip install 'sdrt[controlnet]'") from None
    edges = cv2.Canny(np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)), low, high)  # (H, W)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))


def invert(image: Image.Image) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image.convert("RGB"), dtype=np.uint8))


def depth_map(depth: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """(H', W') relative inverse depth (DPT's: larger = nearer) -> an RGB map of `size`, min..max to 0..255."""
    d = depth.astype(np.float64)
    d = (d - d.min()) / max(float(d.max() - d.min()), 1e-8) * 255.0
    gray = Image.fromarray(np.clip(np.round(d), 0, 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    return gray.convert("RGB")


def run_preprocessor(name: str, image: Image.Image, low: int = 100, high: int = 200, depth=None) -> Image.Image:
    """depth: image -> (H', W') depth array, for "depth" (the pipeline's estimator)."""
    if name == "canny":
        return canny(image, low, high)
    if name == "invert":
        return invert(image)
    if name == "depth":
        if depth is None:
            raise InvalidRequest("the depth preprocessor needs a bundle with a depth estimator")
        return depth_map(depth(image), image.size)
    raise InvalidRequest(f"ControlNet preprocessor {name!r} is not one of none, {', '.join(PREPROCESSORS)}")
