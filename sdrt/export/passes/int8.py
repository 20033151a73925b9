"""An opt-in int8 U-Net for ONNX Runtime on the CPU (`sdrt export --int8`, then `--int8` at generation).

ONNX Runtime's dynamic quantization of the U-Net's MatMuls: weights int8 per output channel in 7 bits
(reduce_range: -64..64), activations u8, quantized per call. Convolutions stay fp32 (their int8 form needs
calibration and moves many more numbers).

Why 7 bits: without VNNI (AVX2 only) ONNX Runtime's u8 x s8 kernel adds pairs of products in 16 bits
(vpmaddubsw), and 2 * 255 * 127 overflows them, so with 8-bit weights a layer's output saturates (under an
emulated AVX2-only EPYC: relative error 0.20 against 0.0094 with 7 bits); 2 * 255 * 64 < 2^15 always fits. On
VNNI CPUs the 7-bit graph runs as fast (SD 1.5 size: 0.75x the fp32 CPU graph's U-Net call, 8 bits 0.78x) at
0.0125 relative error instead of 0.0118; u8 weights are as accurate but slower (0.88x). benchmarks/NOTES.md,
section 11. A 3-step SD 1.5-size image was 42 dB from fp32's (section 5); the embedded model's prompt
adherence is unchanged, though on its tiny matrices int8 gains nothing.

Built from the U-Net's CPU graph when there is one. It holds int8 copies of the weights, so LoRA can't patch it
(the runtime refuses the pair), and it is checked against torch with a looser limit than the fp32 graphs (int8
rounding lands near 1e-2).
"""
from __future__ import annotations

import logging
from pathlib import Path

from ...runtime import names

WEIGHT_RANGE = (-64, 64)  # reduce_range, symmetric: every u8 x s8 pair sum fits in 16 bits, on every x86-64 kernel
INT8_ERROR_LIMIT = 0.05  # relative L2 vs torch; fp32 graphs must stay under verify.RELATIVE_ERROR_LIMIT (1e-3)


def quantize_matmuls(source_graph: Path, target: Path, *, weight_type: str = "QInt8", per_channel: bool = True,
                     reduce_range: bool = True) -> None:
    """ONNX Runtime's dynamic quantization of source_graph's MatMuls into target (+ its .data). The defaults are
    sdrt's choice (see above); benchmarks/int8_options.py measures the others through this same call."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .winograd import MARK

    # Winograd's weight transforms (export/passes/winograd.py) are MatMuls on weights too, folded at load: left fp32
    graph = onnx.load(str(source_graph), load_external_data=False).graph
    keep_fp32 = [node.name for node in graph.node if MARK in node.name]
    logging.disable(logging.WARNING)  # its advice to run its pre-processing script goes to the root logger
    try:
        quantize_dynamic(str(source_graph), str(target), weight_type=getattr(QuantType, weight_type),
                         op_types_to_quantize=["MatMul"], per_channel=per_channel, reduce_range=reduce_range,
                         use_external_data_format=True, nodes_to_exclude=keep_fp32)
    finally:
        logging.disable(logging.NOTSET)


def write_int8_graph(source_graph: Path, log=print) -> Path:
    """unet/model.int8.onnx (+ model.int8.onnx.data) beside source_graph."""
    target = source_graph.parent / names.INT8_MODEL_FILE
    quantize_matmuls(source_graph, target)
    log(f"unet: MatMul weights quantized to int8 ({names.INT8_MODEL_FILE}, opt-in with --int8)")
    return target
