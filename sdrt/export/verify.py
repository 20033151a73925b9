"""Check every exported graph against torch before the bundle is accepted (as Apple's ml-stable-diffusion does).

One error metric for every component and backend: relative L2 error, ||onnx - torch|| / ||torch||.
The export fails above RELATIVE_ERROR_LIMIT. The check runs at shapes other than the traced ones
(batch 1, the bundle's default size), so it also proves the dynamic dimensions work.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ExportFailed
from ..runtime import names

RELATIVE_ERROR_LIMIT = 1e-3  # fp32 graphs land near 1e-6; 1e-3 still catches a wrong op or a lost branch


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if actual.shape != reference.shape:
        return float("inf")
    denom = np.linalg.norm(reference)
    return float(np.linalg.norm(actual - reference) / (denom if denom > 0 else 1.0))


def check_inputs(source, component: str, height: int, width: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed random inputs for one component at batch 1 and the bundle's default size."""
    rng = np.random.default_rng(1234)
    unet, vae, te = source.unet.config, source.vae.config, source.text_encoder.config
    scale = 2 ** (len(vae.block_out_channels) - 1)
    h, w = height // scale, width // scale
    if component == names.TEXT_ENCODER:
        return {names.INPUT_IDS: ids}
    if component == names.UNET:
        return {names.SAMPLE: rng.standard_normal((1, unet.in_channels, h, w), dtype=np.float32),
                names.TIMESTEP: np.array([321.0], dtype=np.float32),
                names.ENCODER_HIDDEN_STATES: rng.standard_normal(
                    (1, te.max_position_embeddings, unet.cross_attention_dim), dtype=np.float32)}
    if component == names.VAE_DECODER:
        return {names.LATENT_SAMPLE: rng.standard_normal((1, vae.latent_channels, h, w), dtype=np.float32)}
    return {names.SAMPLE: rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)}


def verify(component: str, module, onnx_path: Path, feeds: dict[str, np.ndarray]) -> float:
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in feeds.values()))
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(None, feeds)
    worst = max(relative_error(a, e.numpy()) for a, e in zip(actual, expected))
    if not worst <= RELATIVE_ERROR_LIMIT:
        raise ExportFailed(f"{component}: ONNX Runtime differs from torch by relative error {worst:.3g} "
                           f"(limit {RELATIVE_ERROR_LIMIT:g}); the export was not written")
    return worst
