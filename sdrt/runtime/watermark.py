"""Invisible watermark, as Stable Diffusion's reference scripts embed it (invisible-watermark, dwtDct).

The reference (CompVis/stable-diffusion, Stability-AI/stablediffusion `scripts/txt2img.py`) does
`set_watermark('bytes', "StableDiffusionV1".encode('utf-8'))` (SD 2: "SDV2") and `encode(bgr, 'dwtDct')`:
one bit per 4x4 block of the Haar LL band of the U channel, quantised with step 36. That encoder
(invisible-watermark 0.1.5 and 0.2.0, `maxDct.py`) may lower the block maximum it writes, so its own decoder
reads another coefficient, and it swaps the H/V bands when rebuilding U and casts to uint8 unrounded: on
natural images the payload rarely decodes. By default we write the same bits in the same places but only
raise the maximum, keep the bands in order, round and clip, and `WatermarkDecoder('bytes', 136).decode(bgr,
'dwtDct')` reads it; `reference_exact=True` returns the library encoder's output bit for bit.
`import imwatermark` imports torch (rivaGan), so we load only its `maxDct.py` (numpy, cv2, pywt).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import numpy as np
from PIL import Image

from ..errors import MissingDependency

WATERMARK_PAYLOAD = "StableDiffusionV1"  # CompVis/stable-diffusion scripts/txt2img.py
SD2_WATERMARK_PAYLOAD = "SDV2"  # Stability-AI/stablediffusion scripts/txt2img.py
MIN_PIXELS = 256 * 256  # the library refuses to encode or decode anything smaller (h * w)
_SCALE, _BLOCK = 36, 4  # EmbedMaxDct defaults: U-channel step, block side in the LL band
_INSTALL = "pip install 'sdrt[watermark]'"


def _max_dct():
    """imwatermark's maxDct module, loaded without the package __init__ (which imports torch)."""
    spec = importlib.util.find_spec("imwatermark")  # None too when sys.modules["imwatermark"] is None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"watermarking needs invisible-watermark (module imwatermark): {_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "maxDct.py")
    name = "_sdrt_imwatermark_maxdct"
    module = sys.modules.get(name)
    if module is None or module.__file__ != path:
        mspec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mspec)
        try:
            mspec.loader.exec_module(module)
        except (ImportError, OSError) as e:  # cv2 / pywt missing, or the package's layout changed
            raise MissingDependency(f"watermarking needs invisible-watermark and its deps ({e}): {_INSTALL}") from e
        sys.modules[name] = module
    return module


def watermark_available() -> bool:
    try:
        _max_dct()
    except MissingDependency:
        return False
    return True


available = watermark_available


def require() -> None:
    """Raise MissingDependency, naming the extra, when watermarking was asked for but can't be done."""
    _max_dct()


def fits(image: Image.Image, payload: str = WATERMARK_PAYLOAD) -> bool:
    """Whether `image` is large enough to carry `payload` (at least 256x256 and one 8x8 block per bit)."""
    return _fits(image.size, len(payload.encode("utf-8")) * 8)


def payload_for(text_hidden_size: int) -> str:
    """The reference scripts' payload for a model: SD 2.x (OpenCLIP, 1024-wide text) marks "SDV2"."""
    return SD2_WATERMARK_PAYLOAD if text_hidden_size == 1024 else WATERMARK_PAYLOAD


def _bits(payload: str) -> list[int]:
    return [int(b) for b in np.unpackbits(np.frombuffer(payload.encode("utf-8"), np.uint8))]


def _fits(size: tuple[int, int], n_bits: int) -> bool:
    w, h = size
    return w * h >= MIN_PIXELS and (h // 8) * (w // 8) >= n_bits  # every bit in at least one block


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # == cv2.COLOR_RGB2BGR


def _embed(bgr: np.ndarray, bits: list[int], cv2, pywt) -> np.ndarray:
    rows, cols = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV).astype(np.float64)
    ca, details = pywt.dwt2(yuv[:rows, :cols, 1], "haar")
    nr, nc = ca.shape[0] // _BLOCK, ca.shape[1] // _BLOCK
    blocks = ca[: nr * _BLOCK, : nc * _BLOCK].reshape(nr, _BLOCK, nc, _BLOCK).swapaxes(1, 2).reshape(-1, _BLOCK**2)
    pos = np.abs(blocks[:, 1:]).argmax(axis=1) + 1  # the coefficient the decoder will read
    idx = np.arange(len(blocks))
    val, bit = blocks[idx, pos], np.asarray(bits)[idx % len(bits)]  # bits repeat over blocks in row-major order
    new = (np.abs(val) // _SCALE + 0.25 + 0.5 * bit) * _SCALE
    new = np.where(new < np.abs(val), new + _SCALE, new)  # never lower it: it must stay the block's maximum
    blocks[idx, pos] = np.where(val >= 0, new, -new)
    ca[: nr * _BLOCK, : nc * _BLOCK] = blocks.reshape(nr, nc, _BLOCK, _BLOCK).swapaxes(1, 2).reshape(nr * _BLOCK, -1)
    yuv[:rows, :cols, 1] = pywt.idwt2((ca, details), "haar")
    return cv2.cvtColor(np.clip(np.round(yuv), 0, 255).astype(np.uint8), cv2.COLOR_YUV2BGR)


def apply_watermark(images: list[Image.Image], *, payload: str = WATERMARK_PAYLOAD,
                    reference_exact: bool = False) -> list[Image.Image]:
    """RGB images -> the same images (RGB, same size) carrying `payload`; too-small ones come back as they were."""
    mod = _max_dct()
    bits, out, skipped = _bits(payload), [], []
    for image in images:
        if not _fits(image.size, len(bits)):
            skipped.append(image.size)
            out.append(image)
            continue
        if reference_exact:  # what WatermarkEncoder().encode(bgr, 'dwtDct') returns
            marked = mod.EmbedMaxDct(bits, wmLen=len(bits)).encode(_bgr(image))
        else:
            marked = _embed(_bgr(image), bits, mod.cv2, mod.pywt)
        out.append(Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1])))
    if skipped:
        warnings.warn(f"not watermarked: {len(skipped)} image(s) smaller than {MIN_PIXELS} pixels or "
                      f"{len(bits)} 8x8 blocks ({', '.join(f'{w}x{h}' for w, h in skipped)})", stacklevel=2)
    return out


def read_watermark(image: Image.Image, *, payload: str = WATERMARK_PAYLOAD) -> str | None:
    """The text a dwtDct watermark of `payload`'s length carries, or None (too small, absent, or garbled)."""
    mod = _max_dct()
    n_bits = len(payload.encode("utf-8")) * 8
    if not _fits(image.size, n_bits):
        return None
    bits = mod.EmbedMaxDct(watermarks=[], wmLen=n_bits).decode(_bgr(image))  # as WatermarkDecoder.decode does
    try:
        text = np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None
