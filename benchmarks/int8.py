"""The opt-in int8 U-Net against the fp32 one, same bundle (exported with `sdrt export SRC --out BUNDLE --int8`):
one U-Net call each, interleaved, and the PSNR between the two pipelines' images from the same initial noise.

    python benchmarks/int8.py BUNDLE [--rounds 2] [--steps 3] [--json benchmarks/results/int8_sd15.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import psnr  # noqa: E402
from unet_step import unet_feeds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up round")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import sdrt

    pipes = {"fp32": sdrt.Pipeline.load(args.bundle), "int8": sdrt.Pipeline.load(args.bundle, int8=True)}
    m, rng = pipes["fp32"].manifest, np.random.default_rng(0)
    h, w = m.default_height // m.vae_scale_factor, m.default_width // m.vae_scale_factor
    feeds = unet_feeds(m, rng)
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for run in range(args.rounds + 1):  # the first round warms up
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe.engines["unet"](**feeds)
            if run:
                times[name].append(time.perf_counter() - start)
    noise = rng.standard_normal((1, m.latent_channels, h, w)).astype(np.float32)
    images = {k: np.asarray(p.txt2img("a photo of an astronaut", steps=args.steps, latents=noise)[0])
              for k, p in pipes.items()}
    median = {k: float(np.median(v)) for k, v in times.items()}
    result = {"command": shlex.join(["python", "benchmarks/int8.py", *sys.argv[1:]]), "unet_call_s": median,
              "int8_over_fp32": round(median["int8"] / median["fp32"], 3),
              "psnr_db": psnr(images["fp32"], images["int8"]),
              "max_pixel_diff": int(np.abs(images["fp32"].astype(int) - images["int8"]).max()), "steps": args.steps}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
