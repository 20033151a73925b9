"""The cost of ControlNet per denoising step: one guided U-Net step with 0, 1 and 2 ControlNets, sdrt (ONNX
Runtime, CPU graphs: the ControlNets' graphs, their residuals scaled and summed in numpy, then the residual-input
U-Net) against PyTorch eager (diffusers' ControlNetModel and UNet2DConditionModel), on this machine.

    python benchmarks/controlnet.py --runs 30 --calls 10 --json benchmarks/results/controlnet_embedded.json
    python benchmarks/controlnet.py --model /tmp/sd15/model --bundle /tmp/sd15/bundle --work /tmp/sd15/cn \\
        --side sdrt --runs 3 --calls 1 --json benchmarks/results/controlnet_sd15_sdrt.json      # then --side pytorch

The model: a diffusers folder (default: the embedded demo model, sdrt/embedded/model) and its bundle (default:
the embedded bundle); the ControlNets are random-weight ones built from its U-Net (tests/controlnet_models.py;
the weights do not change the cost), exported with `sdrt export` in a child process, kept in --work (default: a
temporary folder). Batch 2 (guidance), the bundle's default size, 77 tokens. Each round times every side: one
untimed call (the other side's threads spin for a while after its last call), then --calls calls whose mean is
one sample. --side runs one side only, for models whose two sides do not fit in memory together (SD 1.5: about
10 GB each); the ratios that matter, with vs without ControlNets, are within one process either way. Next to it,
the TensorRT demo's published per-step ratios (GPU, SD 1.5 at 512x512).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# NVIDIA TensorRT demo, ControlNet_Inference_Performance.png (TRT 8.6, Jul 2023): U-Net ms per step with 0/1/2 nets.
PUBLISHED = {"RTX 6000 Ada": (16.1, 23.4, 31.3), "H800": (15.1, 19.7, 25.8), "A10": (42.4, 58.2, 73.8)}
SIDES = ("sdrt", "pytorch eager")


def controlnets(model: Path, work: Path, size: tuple[int, int]) -> list[tuple[Path, Path]]:
    """Two random ControlNets for the model: (diffusers folder, exported bundle), made once per --work."""
    sys.path.insert(0, str(ROOT / "tests"))
    from controlnet_models import build_controlnet

    out = []
    for k in range(2):
        folder, bundle = work / f"cn{k}", work / f"cn{k}-bundle"
        if not (folder / "config.json").is_file():
            build_controlnet(model, folder, seed=k)
        if not (bundle / "sdrt.json").is_file():
            subprocess.run([sys.executable, "-m", "sdrt.cli", "export", str(folder), "--out", str(bundle), "--force",
                            "--height", str(size[0]), "--width", str(size[1])], check=True)
        out.append((folder, bundle))
    return out


def steps(side: str, pipe, model: Path, nets, x, t, text, image):
    """step(k): one guided U-Net step with the first k ControlNets, on `side`."""
    import torch

    import sdrt
    from sdrt.runtime import names
    from sdrt.runtime.controls import Guide

    m = pipe.manifest
    if side == "sdrt":
        plain, controlled = pipe.engines[names.UNET], pipe._controlled_unet()
        loaded = [sdrt.ControlNet.load(b, threads=pipe.threads, backend="onnxruntime") for _, b in nets]
        guides = [Guide.make([sdrt.Control(n, image) for n in loaded[:k]], False, m.default_width, m.default_height,
                             1, True) for k in (1, 2)]
        feeds = {names.SAMPLE: np.concatenate([x, x]), names.TIMESTEP: t, names.ENCODER_HIDDEN_STATES: text}
        return lambda k: plain(**feeds) if k == 0 else controlled(**feeds, **guides[k - 1].residuals(0, 1, x, t, text, True))
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    torch_nets = [ControlNetModel.from_pretrained(f).eval() for f, _ in nets]
    tx, tt, te = (torch.from_numpy(a) for a in (np.concatenate([x, x]), t, text))
    timg = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None].repeat(2, 0), np.float32) / 255)

    def step(k):
        with torch.no_grad():
            down = mid = None
            for net in torch_nets[:k]:
                d, md = net(tx, tt, te, timg, return_dict=False)
                down, mid = (d, md) if down is None else ([a + b for a, b in zip(down, d)], mid + md)
            return unet(tx, tt, te, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "sdrt" / "embedded" / "model")
    ap.add_argument("--bundle", type=Path, default=ROOT / "sdrt" / "embedded" / "bundle")
    ap.add_argument("--work", type=Path, help="where the ControlNets are built and exported (kept for reuse)")
    ap.add_argument("--side", choices=("both", "sdrt", "pytorch"), default="both")
    ap.add_argument("--runs", type=int, default=20, help="rounds; each times every side")
    ap.add_argument("--calls", type=int, default=10, help="timed calls per side and round (their mean is one sample)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    import sdrt
    from sdrt.bench import machine_info, summarize, versions

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = sdrt.Pipeline.load(args.bundle, threads=args.threads)
        m = pipe.manifest
        nets = controlnets(args.model, args.work or Path(tmp), (m.default_height, m.default_width))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, m.latent_channels, m.default_height // 8, m.default_width // 8), dtype=np.float32)
        t = np.full(2, 500.0, np.float32)
        text = rng.standard_normal((2, 77, m.text_hidden_size), dtype=np.float32)
        image = (rng.uniform(0, 1, (m.default_height, m.default_width, 3)) * 255).astype(np.uint8)
        chosen = SIDES if args.side == "both" else (SIDES[0] if args.side == "sdrt" else SIDES[1],)
        runs = {who: steps(who, pipe, args.model, nets, x, t, text, image) for who in chosen}
        labels = {(who, k): f"{who}, {k} ControlNet{'' if k == 1 else 's'}" for who in chosen for k in (0, 1, 2)}
        times = {label: [] for label in labels.values()}
        for _ in range(args.runs):
            for (who, k), label in labels.items():
                runs[who](k)  # untimed
                started = time.perf_counter()
                for _ in range(args.calls):
                    runs[who](k)
                times[label].append((time.perf_counter() - started) / args.calls)
    stats = {label: summarize(v) for label, v in times.items()}
    ratios = {who: {k: stats[labels[(who, k)]]["median_ms"] / stats[labels[(who, 0)]]["median_ms"] for k in (1, 2)}
              for who in chosen}
    published = {gpu: {k: round(v[k] / v[0], 3) for k in (1, 2)} for gpu, v in PUBLISHED.items()}
    result = {"what": "one guided U-Net step (batch 2) with 0, 1, 2 ControlNets", "bundle": str(args.bundle),
              "size": f"{m.default_width}x{m.default_height}", "runs": args.runs, "calls_per_sample": args.calls,
              "threads": args.threads, "sides": list(chosen), "stats": stats, "ratio_vs_no_controlnet": ratios,
              "tensorrt_demo_published_ratios": published,
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "machine": machine_info(), "versions": versions(),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    for label, s in stats.items():
        print(f"{label:32s} {s['median_ms']:10.2f} ms (p90 {s['p90_ms']:.2f})")
    for who, r in {**ratios, **{f"TensorRT demo, {g}": r for g, r in published.items()}}.items():
        print(f"{who:32s} 1 net {r[1]:.2f}x, 2 nets {r[2]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
