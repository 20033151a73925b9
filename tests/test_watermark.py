"""Invisible watermark: the reference payload round-trips, stays invisible, and is read by the library's decoder."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdrt.errors import MissingDependency
from sdrt.runtime import watermark as wm


def natural_ish(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients, filled shapes, film grain and soft colour mottling: not a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([130 + 70 * np.sin(3 * x + 1), 110 + 60 * np.cos(4 * y), 120 + 50 * np.sin(5 * (x + y))], -1)
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        cx, cy, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, max(w, h) // 5))
        fill = tuple(int(v) for v in rng.integers(30, 226, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=fill)
    mottle = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    pixels = np.asarray(img, float) + rng.normal(0, 4, (h, w, 1)) + (np.asarray(mottle, float) - 128) * 0.5
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def png_roundtrip(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_payloads_are_the_reference_scripts():
    assert wm.WATERMARK_PAYLOAD == "StableDiffusionV1" and wm.SD2_WATERMARK_PAYLOAD == "SDV2"
    assert wm.watermark_available()


@pytest.mark.parametrize("size", [(512, 512), (256, 256), (768, 512), (512, 128)])
def test_payload_reads_back_after_png(size):
    original = natural_ish(*size, seed=sum(size))
    [marked] = wm.apply_watermark([original])
    assert marked.mode == "RGB" and marked.size == original.size
    assert not np.array_equal(np.asarray(marked), np.asarray(original))
    assert wm.read_watermark(png_roundtrip(marked)) == wm.WATERMARK_PAYLOAD


def test_sd2_payload_reads_back():
    [marked] = wm.apply_watermark([natural_ish(512, 512, 7)], payload=wm.SD2_WATERMARK_PAYLOAD)
    assert wm.read_watermark(marked, payload=wm.SD2_WATERMARK_PAYLOAD) == "SDV2"


def test_invisible_psnr_above_35db():
    originals = [natural_ish(512, 512, s) for s in range(4)]
    values = [psnr(o, m) for o, m in zip(originals, wm.apply_watermark(originals))]
    print("PSNR dB:", [round(v, 1) for v in values])
    assert min(values) > 35


def test_the_librarys_own_decoder_reads_it():
    cv2 = pytest.importorskip("cv2")  # a dependency of invisible-watermark: present whenever it is
    from imwatermark import WatermarkDecoder  # the public API (this imports torch; the runtime does not)

    [marked] = wm.apply_watermark([natural_ish(512, 512, 3)])
    bgr = cv2.cvtColor(np.asarray(marked), cv2.COLOR_RGB2BGR)
    assert WatermarkDecoder("bytes", 136).decode(bgr, "dwtDct") == b"StableDiffusionV1"


def test_reference_exact_is_the_reference_scripts_output_bit_for_bit():
    cv2 = pytest.importorskip("cv2")
    from imwatermark import WatermarkEncoder

    image = natural_ish(512, 512, 5)
    encoder = WatermarkEncoder()  # scripts/txt2img.py: put_watermark()
    encoder.set_watermark("bytes", "StableDiffusionV1".encode("utf-8"))
    expected = encoder.encode(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR), "dwtDct")[:, :, ::-1]
    [ours] = wm.apply_watermark([image], reference_exact=True)
    assert np.array_equal(np.asarray(ours), expected)
    # Why it is not the default: the library's encoder loses bits that its decoder then misreads.
    assert wm.read_watermark(ours) != wm.WATERMARK_PAYLOAD


def test_unwatermarked_images_do_not_read_as_the_payload():
    images = [natural_ish(512, 512, 100 + s) for s in range(4)]
    images += [Image.new("RGB", (512, 512), c) for c in [(0, 0, 0), (255, 255, 255), (128, 128, 128)]]
    assert all(wm.read_watermark(im) != wm.WATERMARK_PAYLOAD for im in images)
    assert wm.read_watermark(images[0]) is None


def test_small_images_come_back_unchanged_with_one_warning():
    small = [natural_ish(64, 64), natural_ish(255, 257), natural_ish(16384, 4)]
    big = natural_ish(256, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = wm.apply_watermark(small + [big])
    assert len(caught) == 1 and "64x64" in str(caught[0].message) and "255x257" in str(caught[0].message)
    assert all(o is s for o, s in zip(out, small))
    assert wm.read_watermark(out[-1]) == wm.WATERMARK_PAYLOAD
    assert wm.read_watermark(small[0]) is None


def test_missing_library_raises_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "imwatermark", None)
    assert not wm.watermark_available()
    with pytest.raises(MissingDependency, match=r"pip install 'sdrt\[watermark\]'") as info:
        wm.apply_watermark([natural_ish(256, 256)])
    assert info.value.exit_code == 7
    with pytest.raises(MissingDependency):
        wm.read_watermark(natural_ish(256, 256))


def test_watermarking_does_not_import_torch():
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "onnxruntime"}:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from PIL import Image
        from sdrt.runtime.watermark import apply_watermark, read_watermark
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
        assert read_watermark(apply_watermark([image])[0]) == "StableDiffusionV1"
        assert "torch" not in sys.modules and "imwatermark" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_generated_images_carry_the_watermark_unless_turned_off(pipes):
    pipe = pipes["sd1"]
    [marked] = pipe.txt2img("a red circle on a blue background", steps=3, seed=1, height=512, width=512)
    assert wm.read_watermark(png_roundtrip(marked)) == wm.WATERMARK_PAYLOAD
    assert "Watermark: dwtDct StableDiffusionV1" in marked.info["parameters"]
    [plain] = pipe.txt2img("a red circle on a blue background", steps=3, seed=1, height=512, width=512,
                           watermark=False)
    assert "Watermark" not in plain.info["parameters"] and wm.read_watermark(plain) is None
    assert psnr(plain, marked) > 30
    [small] = pipe.txt2img("a", steps=1, seed=1)  # 64x64: too small to carry it, left unmarked without a fuss
    # (at 256x256 these high-contrast random-weight images lose 3-6 of 136 bits to clipping; at 512, none)
    assert "Watermark" not in small.info["parameters"]


def test_asking_for_a_watermark_without_the_library_names_the_extra(pipes, monkeypatch):
    monkeypatch.setitem(sys.modules, "imwatermark", None)
    monkeypatch.delitem(sys.modules, "_sdrt_imwatermark_maxdct", raising=False)
    with pytest.raises(MissingDependency, match=r"pip install 'sdrt\[watermark\]'"):
        pipes["sd1"].txt2img("a", steps=1, watermark=True)
    assert "Watermark" not in pipes["sd1"].txt2img("a", steps=1, height=256, width=256)[0].info["parameters"]
