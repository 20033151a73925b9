"""One U-Net call (or one VAE decode, --vae), three ways, interleaved: PyTorch eager (diffusers'
UNet2DConditionModel, SDPA attention), ONNX Runtime on the bundle's plain graph, and on its CPU graph
(unet/model.cpu.onnx: fused attention, Winograd convolutions).
The U-Net alone, without the pipeline around it, so the per-call ratio is not blurred by the rest.

    python benchmarks/unet_step.py /tmp/sd15/bundle /tmp/sd15/model --runs 3 --json benchmarks/results/unet_step_sd15.json

Inputs: batch 2 (classifier-free guidance), the bundle's default size, 77 tokens; the same arrays for all three.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np


def unet_feeds(m, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One guided U-Net call's inputs at the bundle's default size: batch 2, 77 tokens."""
    h, w = m.default_height // m.vae_scale_factor, m.default_width // m.vae_scale_factor
    return {"sample": rng.standard_normal((2, m.unet_in_channels, h, w), dtype=np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, m.text_hidden_size), dtype=np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("src", type=Path, help="the diffusers folder the bundle was exported from")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--vae", action="store_true", help="time the VAE decoder instead (torch vae.decode vs the graph)")
    ap.add_argument("--no-plain", action="store_true", help="leave the plain graph out (at 768x768 PyTorch and both "
                    "graphs together need more than this machine's 24 GiB: the plain graph's attention alone peaks at 10 GB)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch
    from diffusers import UNet2DConditionModel

    from sdrt.bench import machine_info, summarize, versions
    from sdrt.runtime.engines.ort import OrtEngine
    from sdrt.runtime.manifest import load_manifest

    torch.set_num_threads(args.threads)
    m = load_manifest(args.bundle)
    h, w = m.default_height // m.vae_scale_factor, m.default_width // m.vae_scale_factor
    rng = np.random.default_rng(0)
    feeds = unet_feeds(m, rng)
    if args.vae:  # (1, 4, h, w) latents -> (1, 3, H, W): one image's decode
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.src / "vae", torch_dtype=torch.float32).eval()
        z = rng.standard_normal((1, m.latent_channels, h, w), dtype=np.float32)
        sides = {"pytorch eager": lambda: vae.decode(torch.from_numpy(z), return_dict=False)[0].numpy()}
        engines, component, feeds, out = {"onnxruntime plain graph": m.graphs["vae_decoder"].path}, "vae_decoder", \
            {"latent_sample": z}, "sample"
        if "vae_decoder" in m.cpu_graphs:
            engines["onnxruntime CPU graph"] = m.cpu_graphs["vae_decoder"]
    else:
        unet = UNet2DConditionModel.from_pretrained(args.src / "unet", torch_dtype=torch.float32).eval()
        t_feeds = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
        sides = {"pytorch eager": lambda: unet(*t_feeds, return_dict=False)[0].numpy()}
        engines, component, out = {"onnxruntime plain graph": m.graphs["unet"].path}, "unet", "out_sample"
        if "unet" in m.cpu_graphs:
            engines["onnxruntime CPU graph"] = m.cpu_graphs["unet"]
    if args.no_plain and len(engines) > 1:
        del engines[next(iter(engines))]  # the plain graph comes first
    for name, rel in engines.items():
        engine = OrtEngine(args.bundle / rel, component, args.threads)
        sides[name] = lambda e=engine: e(**feeds)[out]
    times: dict[str, list[float]] = {k: [] for k in sides}
    outputs = {}
    with torch.no_grad():
        for run in range(args.runs + 1):  # the first round warms up
            for name, call in sides.items():
                start = time.perf_counter()
                outputs[name] = call()
                if run:
                    times[name].append(time.perf_counter() - start)
                print(f"round {run} {name}: {time.perf_counter() - start:.2f} s", file=sys.stderr)
    ref = outputs["pytorch eager"]
    result = {"command": shlex.join(["python", "benchmarks/unet_step.py", *sys.argv[1:]]),
              "machine": machine_info(None), "versions": {**versions(), "torch": torch.__version__},
              "component": "vae_decoder" if args.vae else "unet",
              "shape": {"batch": 1, "latent": [h, w]} if args.vae else {"batch": 2, "latent": [h, w], "tokens": 77},
              "threads": args.threads, "runs": args.runs, "sides": {}}
    baseline = summarize(times["pytorch eager"])["median_ms"]
    for name in sides:
        stats = summarize(times[name])
        err = float(np.linalg.norm(outputs[name] - ref) / np.linalg.norm(ref))
        ratio = round(stats["median_ms"] / baseline, 3)
        result["sides"][name] = {**stats, "ratio_to_pytorch": ratio, "relative_error_vs_pytorch": err}
        print(f"{name:36s} median {stats['median_ms'] / 1e3:7.2f} s  ratio {ratio:.3f}  rel. error {err:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
