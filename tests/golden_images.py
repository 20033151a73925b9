"""Golden images: the embedded model's pictures for fixed seeds, made once on one machine and committed, so a
test can regenerate them on whatever CPU it runs on and say how far that CPU's pixels are from them.

    python tests/golden_images.py --write    # re-make tests/golden/*.png and golden.json (on purpose only)

The seeds' noise is numpy's PCG64, the same bits everywhere; the samplers' arithmetic is correctly rounded
(sdrt/runtime/samplers/fmath.py); what may differ per CPU is ONNX Runtime's kernels (MLAS picks AVX-512, AVX2 or
SSE code for each GEMM and convolution, which sum in different orders) and sdrt's own CPU kernels (built with
-march=native). golden.json records the CPU the images were made on.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).with_name("golden")
PROMPT = "a large red circle on a blue background"
SEEDS = (1, 2, 3)
SAMPLERS = ("euler", "euler_a", "dpmpp_2m_karras")


def cases() -> list[dict]:
    """name -> how it is made: mode, sampler, seed."""
    out = [{"name": f"txt2img-{s}-{seed}", "mode": "txt2img", "sampler": s, "seed": seed}
           for s in SAMPLERS for seed in SEEDS]
    out += [{"name": f"{mode}-euler-{seed}", "mode": mode, "sampler": "euler", "seed": seed}
            for mode in ("img2img", "inpaint") for seed in SEEDS]
    return out


def source_picture() -> np.ndarray:
    """img2img's and inpainting's input, drawn in code: a yellow square on green, 64x64 RGB uint8."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = (40, 160, 60)
    img[16:48, 16:48] = (230, 210, 30)
    return img


def inpaint_mask() -> np.ndarray:
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 24:56] = 255
    return mask


def render(pipe, case: dict) -> np.ndarray:
    """One golden case's picture, (64, 64, 3) uint8."""
    options = {"steps": 20, "seed": case["seed"], "sampler": case["sampler"]}
    if case["mode"] == "txt2img":
        images = pipe.txt2img(PROMPT, **options)
    elif case["mode"] == "img2img":
        images = pipe.img2img(source_picture(), "a small purple triangle on a yellow background", strength=0.6,
                              **options)
    else:
        images = pipe.inpaint(source_picture(), inpaint_mask(), "a small white square on a green background",
                              **options)
    return np.asarray(images[0].convert("RGB"), dtype=np.uint8)


def machine() -> dict:
    from numpy._core._multiarray_umath import __cpu_features__ as features
    import onnxruntime

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "vector_extensions": sorted(k for k, on in features.items() if on and
                                                      k.startswith(("AVX512", "AVX2", "FMA3", "AVX512_VNNI"))),
            "numpy": np.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def write() -> None:
    from PIL import Image

    import sdrt

    pipe = sdrt.Pipeline.load()
    GOLDEN.mkdir(exist_ok=True)
    for case in cases():
        Image.fromarray(render(pipe, case)).save(GOLDEN / f"{case['name']}.png")
    meta = {"made_on": machine(), "prompt": PROMPT, "steps": 20, "cases": cases()}
    (GOLDEN / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(cases())} images to {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="re-make the golden images (commit them on purpose)")
    if ap.parse_args().write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        write()
    else:
        ap.print_help()
