"""Check every exported graph against torch before the bundle is accepted (as Apple's ml-stable-diffusion does).

One error metric for every component and backend: relative L2 error, ||onnx - torch|| / ||torch||.
The export fails above RELATIVE_ERROR_LIMIT. The check runs at shapes other than the traced ones
(batch 1, the bundle's default size), so it also proves the dynamic dimensions work.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ExportFailed

RELATIVE_ERROR_LIMIT = 1e-3  # fp32 graphs land near 1e-6; 1e-3 still catches a wrong op or a lost branch


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if actual.shape != reference.shape:
        return float("inf")
    denom = np.linalg.norm(reference)
    return float(np.linalg.norm(actual - reference) / (denom if denom > 0 else 1.0))


def verify(component: str, expected: list, onnx_path: Path, feeds: dict[str, np.ndarray],
           limit: float | None = None, native_ops: Path | None = None) -> float:
    """Run the graph on feeds; its worst relative error vs torch's outputs (default limit: RELATIVE_ERROR_LIMIT).
    native_ops: sdrt's operator library to run the graph with (runtime/engines/native_ops.py); without it ONNX Runtime
    runs the functions that stand in for those operators."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if native_ops is not None:
        opts.register_custom_ops_library(str(native_ops))
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    actual = session.run(None, feeds)
    worst = max(relative_error(a, e) for a, e in zip(actual, expected, strict=True))
    limit = RELATIVE_ERROR_LIMIT if limit is None else limit
    if not worst <= limit:
        raise ExportFailed(f"{component}: ONNX Runtime differs from torch by relative error {worst:.3g} "
                           f"(limit {limit:g}); the export was not written")
    return worst
