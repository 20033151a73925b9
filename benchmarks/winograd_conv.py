"""One 3x3 convolution, direct (ONNX Runtime's Conv) against its Winograd F(4x4, 3x3) form
(sdrt/export/passes/winograd.py), interleaved, by channel count and feature-map size: the measurements behind
winograd.RULES["auto"].

    python benchmarks/winograd_conv.py --json benchmarks/results/winograd_conv.json
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

ROOT = Path(__file__).resolve().parents[1]
CASES = [(320, 64), (512, 64), (512, 128), (256, 256), (128, 512), (1280, 16)]  # (channels in = out, side)


def conv_model(channels: int, rng):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    node = helper.make_node("Conv", ["x", "m.conv.weight", "m.conv.bias"], ["y"], pads=[1, 1, 1, 1], name="/m/conv")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "m.conv.weight"), numpy_helper.from_array(b, "m.conv.bias")])
    return helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from sdrt.bench import machine_info, versions
    from sdrt.export.passes import winograd

    rng, rows = np.random.default_rng(0), []
    for channels, side in CASES:
        direct = conv_model(channels, rng)
        fast = onnx.ModelProto.FromString(direct.SerializeToString())
        winograd.rewrite(fast, {"m.conv.weight": (side, side)}, "all")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = args.threads, 3
        sessions = {k: ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                    for k, m in (("direct", direct), ("winograd", fast))}
        x = rng.standard_normal((1, channels, side, side), dtype=np.float32)
        times, outs = {k: [] for k in sessions}, {}
        for run in range(args.runs + 1):  # the first round warms up
            for k, s in sessions.items():
                start = time.perf_counter()
                outs[k] = s.run(None, {"x": x})[0]
                if run:
                    times[k].append(time.perf_counter() - start)
        med = {k: float(np.median(v)) for k, v in times.items()}
        err = float(np.abs(outs["winograd"] - outs["direct"]).max() / np.abs(outs["direct"]).max())
        rows.append({"channels": channels, "side": side, "direct_ms": round(med["direct"] * 1e3, 1),
                     "winograd_ms": round(med["winograd"] * 1e3, 1),
                     "ratio": round(med["winograd"] / med["direct"], 3), "max_relative_difference": err})
        print(f"{channels:5d} channels {side:4d}x{side:<4d} direct {med['direct'] * 1e3:7.1f} ms  winograd "
              f"{med['winograd'] * 1e3:7.1f} ms  ratio {med['winograd'] / med['direct']:.2f}  (diff {err:.1e})")
    if args.json:
        result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "machine": machine_info(),
                  "versions": versions(), "threads": args.threads, "runs": args.runs, "batch": 1, "rows": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
