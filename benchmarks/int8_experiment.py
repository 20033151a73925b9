"""benchmarks/NOTES.md section 5: ONNX Runtime's dynamic int8 quantization of a bundle's U-Net MatMuls
(weights int8 per output channel, activations quantized per call), written as a copy of the bundle whose only
U-Net graph is the quantized one (from the fused-attention CPU graph when the bundle has it), re-hashed so
`sdrt.Pipeline.load` accepts it. An experiment, not a supported mode: LoRA can't reach int8 weights.

    python benchmarks/int8_experiment.py BUNDLE OUT [--ops MatMul]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sdrt.runtime.fsutil import sha256_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--ops", default="MatMul", help="comma-separated operator types to quantize")
    args = ap.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    manifest = json.loads((args.bundle / "sdrt.json").read_text())
    graph = manifest.get("cpu_graphs", {}).get("unet", manifest["graphs"]["unet"]["path"])
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.bundle, args.out)
    for f in (args.out / "unet").glob("model*.onnx*"):
        f.unlink()
    quantize_dynamic(str(args.bundle / graph), str(args.out / "unet" / "model.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=args.ops.split(","), per_channel=True, use_external_data_format=True)
    manifest["cpu_graphs"] = {}
    manifest["files"] = {p.relative_to(args.out).as_posix(): sha256_file(p) for p in sorted(args.out.rglob("*"))
                         if p.is_file() and p.name != "sdrt.json"}
    (args.out / "sdrt.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
