"""A hypernetwork on a full-size bundle: what `sdrt hypernetwork add` costs (time, peak memory, disk) and what the
hypernetwork costs per U-Net call, against PyTorch doing the same (diffusers' U-Net with an attention processor
applying A1111's rule) in the same run.

    python benchmarks/full_size.py sd15 /tmp/sd15        # first: the SD 1.5-size bundle and its diffusers folder
    python benchmarks/hypernetwork.py /tmp/sd15/bundle /tmp/sd15/model --runs 3 \\
        --json benchmarks/results/hypernetwork_sd15.json

The file: A1111's default structure (layer_structure [1, 2, 1], relu, no layer norm) at the widths A1111's
"Create hypernetwork" pre-checks (768, 320, 640, 1280): every self- and cross-attention of SD 1.5 changes.
Each stage runs in its own process (peak memory per stage; torch freed before ONNX Runtime opens).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

WIDTHS = (320, 640, 768, 1280)


def _child(stage: str, *args: str) -> dict:
    """Run one stage of this script in a fresh process; its JSON result plus its peak RSS."""
    out = subprocess.run([sys.executable, __file__, "--stage", stage, *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _timed(fn, runs: int) -> dict:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(sorted(samples)[len(samples) // 2], 1), "min_ms": round(min(samples), 1),
            "samples": runs}


def stage_add(bundle: Path, file: Path) -> dict:
    from sdrt.export import add_hypernetwork

    started = time.perf_counter()
    name = add_hypernetwork(bundle, file, allow_pickle=True, log=lambda m: print(m, file=sys.stderr))
    files = {p.name: round(p.stat().st_size / 2**20, 2) for p in (bundle / "unet" / "hypernet").glob(f"{name}.*")}
    return {"seconds": round(time.perf_counter() - started, 1), "files_mib": files}


def stage_onnx(bundle: Path, name: str, runs: int, seed: int) -> dict:
    import numpy as np
    from unet_step import unet_feeds

    from sdrt.runtime import names
    from sdrt.runtime.engines import OrtEngine
    from sdrt.runtime.manifest import load_manifest

    m = load_manifest(bundle)
    feeds = unet_feeds(m, np.random.default_rng(seed))
    comp = m.hypernetworks[name]["component"]
    plain = OrtEngine(bundle / m.cpu_graphs[names.UNET], names.UNET)
    variant = OrtEngine(bundle / m.cpu_graphs[comp], comp, data_dir=bundle / names.UNET)
    s = {names.HYPERNETWORK_STRENGTH: np.float32(1.0)}
    out = variant(**feeds, **s)[names.OUT_SAMPLE]
    np.save(bundle.parent / "hypernet_onnx_out.npy", out)
    result = {"plain": _timed(lambda: plain(**feeds), runs), "hypernetwork": _timed(lambda: variant(**feeds, **s), runs)}
    return result


def stage_torch(src: Path, file: Path, bundle: Path, runs: int, seed: int) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from unet_step import unet_feeds

    from sdrt.export.hypernet_file import read_hypernetwork
    from sdrt.export.hypernet_torch import applied
    from sdrt.runtime.manifest import load_manifest

    feeds = {k: torch.from_numpy(v) for k, v in unet_feeds(load_manifest(bundle), np.random.default_rng(seed)).items()}
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    hn = read_hypernetwork(file, allow_pickle=True)

    def call():
        with torch.no_grad():
            return unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"]).sample

    result = {"plain": _timed(call, runs)}
    with applied(unet, [(hn, 1.0)]):
        result["hypernetwork"] = _timed(call, runs)
        want = call().numpy()
    got = np.load(bundle.parent / "hypernet_onnx_out.npy")
    result["onnx_relative_error"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("src", type=Path, help="the diffusers folder the bundle was exported from")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    file = args.bundle.parent / "a1111_default.pt"
    if args.stage:
        stages = {"add": lambda: stage_add(args.bundle, file),
                  "onnx": lambda: stage_onnx(args.bundle, file.stem, args.runs, args.seed),
                  "torch": lambda: stage_torch(args.src, file, args.bundle, args.runs, args.seed)}
        result = stages[args.stage]()
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print(json.dumps(result))
        return
    from hypernet_files import write_a1111

    from sdrt.bench import machine_info, versions

    if not file.exists():
        write_a1111(file, WIDTHS, layer_structure=(1, 2, 1), activation="relu", std=0.3)
    result = {"command": shlex.join(["python", "benchmarks/hypernetwork.py", *sys.argv[1:]]),
              "machine": machine_info(None), "versions": versions(),
              "file": {"widths": list(WIDTHS), "layer_structure": [1, 2, 1], "activation": "relu",
                       "mib": round(file.stat().st_size / 2**20, 1)}}
    result["add"] = _child("add", str(args.bundle), str(args.src))
    result["unet_call_onnxruntime_cpu_graph"] = _child("onnx", str(args.bundle), str(args.src),
                                                       "--runs", str(args.runs), "--seed", str(args.seed))
    result["unet_call_pytorch"] = _child("torch", str(args.bundle), str(args.src),
                                         "--runs", str(args.runs), "--seed", str(args.seed))
    ours, peer = result["unet_call_onnxruntime_cpu_graph"], result["unet_call_pytorch"]
    result["ratios"] = {
        "sdrt hypernetwork / sdrt plain": round(ours["hypernetwork"]["median_ms"] / ours["plain"]["median_ms"], 3),
        "pytorch hypernetwork / pytorch plain": round(peer["hypernetwork"]["median_ms"] / peer["plain"]["median_ms"], 3),
        "sdrt hypernetwork / pytorch hypernetwork": round(ours["hypernetwork"]["median_ms"]
                                                         / peer["hypernetwork"]["median_ms"], 3)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
