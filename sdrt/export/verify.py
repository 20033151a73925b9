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
        return {names.INPUTS_EMBEDS: token_embeddings(source)[ids]}
    if component == names.UNET:
        return {names.SAMPLE: rng.standard_normal((1, unet.in_channels, h, w), dtype=np.float32),
                names.TIMESTEP: np.array([321.0], dtype=np.float32),
                names.ENCODER_HIDDEN_STATES: rng.standard_normal(  # two chunks: a long prompt's 154 tokens
                    (1, 2 * te.max_position_embeddings, unet.cross_attention_dim), dtype=np.float32)}
    if component == names.VAE_DECODER:
        return {names.LATENT_SAMPLE: rng.standard_normal((1, vae.latent_channels, h, w), dtype=np.float32)}
    if component == names.DEPTH_ESTIMATOR:
        return {names.PIXEL_VALUES: rng.uniform(-1, 1, (1, 3, 384, 384)).astype(np.float32)}
    return {names.SAMPLE: rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)}


def token_embeddings(source) -> np.ndarray:
    """(vocab, D) float32: the text encoder's lookup table, which the runtime applies."""
    return source.text_encoder.get_input_embeddings().weight.detach().float().numpy()


def expected_outputs(source, component: str, module, feeds: dict[str, np.ndarray], ids: np.ndarray) -> list:
    """What torch gives. The text encoder is checked against CLIPTextModel's own forward on the token ids,
    not against the export wrapper, so a wrapper that drifted from transformers is caught too."""
    import torch

    with torch.no_grad():
        if component == names.TEXT_ENCODER:
            te = source.text_encoder
            out = te(input_ids=torch.from_numpy(ids), output_hidden_states=True)
            final_norm = getattr(te, "text_model", te).final_layer_norm
            return [out.last_hidden_state.numpy(), final_norm(torch.stack(out.hidden_states, dim=1)).numpy()]
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


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
