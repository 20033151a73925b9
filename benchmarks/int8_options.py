"""Which int8 quantization of the U-Net's MatMuls is accurate on every x86-64 CPU: each option's relative L2
error against the fp32 graph (the measure and limit `sdrt export --int8` checks against torch), and one U-Net
call's time against fp32's (interleaved), on the CPU this runs on.

ONNX Runtime's dynamic quantization multiplies u8 activations by s8 weights. Without VNNI (AVX2 only) its kernel
sums pairs of u8 x s8 products in 16 bits (vpmaddubsw), which saturates when both are large, and a whole
layer's output goes wrong. reduce_range (7-bit weights) keeps every pair sum inside 16 bits; u8 weights take
another kernel. Run it on each CPU kind (under `qemu-x86_64 -cpu EPYC-v1`, an AVX2-only CPU can be had on any
x86-64 machine: slow, but its arithmetic is the emulated CPU's).

    python benchmarks/int8_options.py BUNDLE [--rounds 3] [--json benchmarks/results/int8_options_<cpu>.json]

BUNDLE: one exported without --int8 (its U-Net CPU graph, or plain graph, is quantized here into a temporary
folder).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_step import unet_feeds  # noqa: E402

OPTIONS = {  # name -> sdrt.export.passes.int8.quantize_matmuls keyword arguments
    "s8-per-channel": {"weight_type": "QInt8", "per_channel": True, "reduce_range": False},  # sdrt before
    "s8-per-channel-reduce-range": {"weight_type": "QInt8", "per_channel": True, "reduce_range": True},  # sdrt's
    "s8-per-tensor-reduce-range": {"weight_type": "QInt8", "per_channel": False, "reduce_range": True},
    "u8-per-channel": {"weight_type": "QUInt8", "per_channel": True, "reduce_range": False},
}


def cpu_flags() -> list[str]:
    """The vector extensions the CPU reports through cpuid (as numpy reads them: under an emulator, the
    emulated CPU's, where /proc/cpuinfo would show the host's)."""
    from numpy._core._multiarray_umath import __cpu_features__ as features

    return sorted(k for k, on in features.items() if on and k.startswith(("AVX", "FMA", "AMX")))


def interleaved(sessions: dict, feeds, rounds: int) -> tuple[dict, dict]:
    """Each session's outputs and median call time, the calls interleaved round by round (a busy spell of the
    host then slows every side alike)."""
    outputs = {name: session.run(None, feeds) for name, session in sessions.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return outputs, {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", choices=sorted(OPTIONS), help="a subset of the options")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (1: the kernels' ratio, "
                    "not the thread pool's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    from sdrt.export.passes.int8 import quantize_matmuls
    from sdrt.export.verify import relative_error
    from sdrt.runtime.manifest import load_manifest

    m = load_manifest(args.bundle)
    cpu = args.bundle / "unet" / "model.cpu.onnx"
    source = cpu if cpu.is_file() else args.bundle / "unet" / "model.onnx"
    feeds = unet_feeds(m, np.random.default_rng(0))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"fp32": ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])}
        for name in args.only or OPTIONS:
            target = Path(tmp) / f"{name}.onnx"
            quantize_matmuls(source, target, **OPTIONS[name])
            sessions[name] = ort.InferenceSession(str(target), opts, providers=["CPUExecutionProvider"])
        outputs, seconds = interleaved(sessions, feeds, args.rounds)
    fp32_s = seconds.pop("fp32")
    for name, s in seconds.items():
        rows[name] = {"relative_error": round(relative_error(outputs[name][0], outputs["fp32"][0]), 5),
                      "unet_call_s": round(s, 5), "over_fp32": round(s / fp32_s, 3)}
        print(name, rows[name], flush=True)
    result = {"command": shlex.join(["python", "benchmarks/int8_options.py", *sys.argv[1:]]),
              "bundle": args.bundle.name, "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
              "onnxruntime": ort.__version__, "threads": args.threads, "source_graph": source.name,
              "fp32_unet_call_s": round(fp32_s, 5), "options": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
