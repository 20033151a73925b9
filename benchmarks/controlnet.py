"""The cost of ControlNet per denoising step: one guided U-Net step with 0, 1 and 2 ControlNets, sdrt (ONNX
Runtime, CPU graphs: the ControlNets' graphs, their residuals scaled and summed in numpy, then the residual-input
U-Net) against PyTorch eager (diffusers' ControlNetModel and UNet2DConditionModel), interleaved, on this machine.

    python benchmarks/controlnet.py --runs 30 --calls 10 --json benchmarks/results/controlnet_embedded.json

The model: a diffusers folder (default: the embedded demo model, sdrt/embedded/model) and its bundle (default:
the embedded bundle); the ControlNets are random-weight ones built from its U-Net (tests/controlnet_models.py;
the weights do not change the cost) and exported into a temporary folder. Batch 2 (guidance), the bundle's
default size, 77 tokens. Next to it, the TensorRT demo's published per-step ratios (GPU, SD 1.5 at 512x512).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# NVIDIA TensorRT demo, ControlNet_Inference_Performance.png (TRT 8.6, Jul 2023): U-Net ms per step with 0/1/2 nets.
PUBLISHED = {"RTX 6000 Ada": (16.1, 23.4, 31.3), "H800": (15.1, 19.7, 25.8), "A10": (42.4, 58.2, 73.8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "sdrt" / "embedded" / "model")
    ap.add_argument("--bundle", type=Path, default=ROOT / "sdrt" / "embedded" / "bundle")
    ap.add_argument("--runs", type=int, default=20, help="interleaved rounds; each times every side")
    ap.add_argument("--calls", type=int, default=10, help="consecutive calls per side and round (their mean is one sample)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from controlnet_models import build_controlnet

    import sdrt
    from sdrt.bench import machine_info, summarize, versions
    from sdrt.export import export_controlnet
    from sdrt.runtime import names
    from sdrt.runtime.controls import Guide

    torch.set_num_threads(args.threads)
    pipe = sdrt.Pipeline.load(args.bundle, threads=args.threads)
    m = pipe.manifest
    h, w = m.default_height // m.vae_scale_factor, m.default_width // m.vae_scale_factor
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, m.latent_channels, h, w), dtype=np.float32)
    x2, t = np.concatenate([x, x]), np.full(2, 500.0, np.float32)
    text = rng.standard_normal((2, 77, m.text_hidden_size), dtype=np.float32)
    image = rng.uniform(0, 1, (m.default_height, m.default_width, 3))
    with tempfile.TemporaryDirectory() as tmp:
        folders = [build_controlnet(args.model, Path(tmp) / f"cn{k}", seed=k) for k in range(2)]
        nets = []
        for k, f in enumerate(folders):
            export_controlnet(f, Path(tmp) / f"b{k}", height=m.default_height, width=m.default_width, log=lambda *_: None)
            nets.append(sdrt.ControlNet.load(Path(tmp) / f"b{k}", threads=args.threads))
        unet = UNet2DConditionModel.from_pretrained(args.model / "unet").eval()
        torch_nets = [ControlNetModel.from_pretrained(f).eval() for f in folders]
        plain, controlled = pipe.engines[names.UNET], pipe._controlled_unet()
        img = (image * 255).astype(np.uint8)
        guides = [Guide.make([sdrt.Control(n, img) for n in nets[:k]], False, m.default_width, m.default_height, 1,
                             True) for k in (1, 2)]
        feeds = {names.SAMPLE: x2, names.TIMESTEP: t, names.ENCODER_HIDDEN_STATES: text}

        def sdrt_step(k):
            if k == 0:
                return plain(**feeds)
            return controlled(**feeds, **guides[k - 1].residuals(0, 1, x, t, text, True))

        tx, tt, te = (torch.from_numpy(a) for a in (x2, t, text))
        timg = torch.from_numpy(np.ascontiguousarray(guides[0].images[0]))

        def torch_step(k):
            with torch.no_grad():
                if k == 0:
                    return unet(tx, tt, te).sample
                down, mid = None, None
                for net in torch_nets[:k]:
                    d, md = net(tx, tt, te, timg, return_dict=False)
                    down, mid = (d, md) if down is None else ([a + b for a, b in zip(down, d)], mid + md)
                return unet(tx, tt, te, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

        sides = {f"{who}, {k} ControlNet{'s' if k != 1 else ''}": (fn, k)
                 for who, fn in (("sdrt", sdrt_step), ("pytorch eager", torch_step)) for k in (0, 1, 2)}
        for fn, k in sides.values():
            fn(k)  # warm-up
        times = {label: [] for label in sides}
        for _ in range(args.runs):  # interleaved: drift in the machine's speed hits every side alike
            for label, (fn, k) in sides.items():
                fn(k)  # untimed: the other framework's threads spin for a while after its last call
                started = time.perf_counter()
                for _ in range(args.calls):
                    fn(k)
                times[label].append((time.perf_counter() - started) / args.calls)
    stats = {label: summarize(v) for label, v in times.items()}
    ratios = {who: {k: stats[f"{who}, {k} ControlNet{'s' if k != 1 else ''}"]["median_ms"] /
                    stats[f"{who}, 0 ControlNets"]["median_ms"] for k in (1, 2)} for who in ("sdrt", "pytorch eager")}
    published = {gpu: {k: v[k] / v[0] for k in (1, 2)} for gpu, v in PUBLISHED.items()}
    result = {"what": "one guided U-Net step (batch 2) with 0, 1, 2 ControlNets", "bundle": str(args.bundle),
              "size": f"{m.default_width}x{m.default_height}", "runs": args.runs, "calls_per_sample": args.calls, "threads": args.threads,
              "stats": stats, "ratio_vs_no_controlnet": ratios, "tensorrt_demo_published_ratios": published,
              "machine": machine_info(), "versions": versions(),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    for label, s in stats.items():
        print(f"{label:32s} {s['median_ms']:8.2f} ms (p90 {s['p90_ms']:.2f})")
    for who, r in {**ratios, **{f"TensorRT demo, {g}": r for g, r in published.items()}}.items():
        print(f"{who:32s} 1 net {r[1]:.2f}x, 2 nets {r[2]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
