"""The ONNX Runtime CPU engine (sdrt/runtime/engines/ort.py): a small graph runs a batch as one-thread pieces side by
side and must give exactly what the whole batch gives; a large graph, or one without a shared batch dimension,
runs whole; a failure in a piece is the engine's typed error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdrt.errors import EngineError
from sdrt.runtime.engines.ort import OrtEngine
from sdrt.runtime.manifest import load_manifest

EMBEDDED = Path(__file__).resolve().parents[1] / "sdrt" / "embedded" / "bundle"


def unet_inputs(batch: int, rng=np.random.default_rng(3)) -> dict[str, np.ndarray]:
    return {"sample": rng.standard_normal((batch, 4, 8, 8), dtype=np.float32),
            "timestep": np.full(batch, 321.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32)}


def unet_path() -> Path:
    """The graph the CPU backend opens: the CPU graph (fused attention) when the bundle has one."""
    m = load_manifest(EMBEDDED)
    return EMBEDDED / m.cpu_graphs.get("unet", m.graphs["unet"].path)


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_a_split_batch_equals_the_whole_batch_bit_for_bit(batch):
    split, whole = OrtEngine(unet_path(), "unet", threads=2), OrtEngine(unet_path(), "unet", threads=2)
    whole._pieces = 1
    assert split._pieces == 2
    feeds = unet_inputs(batch)
    got, want = split(**feeds)["out_sample"], whole(**feeds)["out_sample"]
    assert got.shape == (batch, 4, 8, 8) and np.array_equal(got, want)
    assert split._pool is not None and whole._pool is None


def test_batch_one_and_one_thread_run_whole():
    one_thread = OrtEngine(unet_path(), "unet", threads=1)
    assert one_thread._pieces == 1
    two = OrtEngine(unet_path(), "unet", threads=2)
    two(**unet_inputs(1))
    assert two._pool is None  # nothing to split


def test_large_graphs_run_whole_on_every_thread(monkeypatch):
    monkeypatch.setattr(OrtEngine, "SPLIT_MAX_WEIGHT_BYTES", 1000)
    engine = OrtEngine(unet_path(), "unet", threads=2)
    assert engine._pieces == 1 and engine.session.get_session_options().intra_op_num_threads == 2


def test_small_graphs_run_each_call_on_one_thread():
    assert OrtEngine(unet_path(), "unet", threads=2).session.get_session_options().intra_op_num_threads == 1


def test_the_vae_runs_whole_on_every_thread_even_when_small():
    path = EMBEDDED / load_manifest(EMBEDDED).graphs["vae_decoder"].path
    engine = OrtEngine(path, "vae_decoder", threads=2)
    assert engine._pieces == 1 and engine.session.get_session_options().intra_op_num_threads == 2
    latents = np.random.default_rng(4).standard_normal((2, 4, 8, 8), dtype=np.float32)
    assert engine(latent_sample=latents)["sample"].shape == (2, 3, 64, 64) and engine._pool is None


def test_inputs_whose_batches_disagree_are_not_split_and_fail_typed():
    engine = OrtEngine(unet_path(), "unet", threads=2)
    feeds = unet_inputs(2) | {"timestep": np.full(3, 321.0, np.float32)}
    with pytest.raises(EngineError, match="unet failed in ONNX Runtime"):
        engine(**feeds)
    assert engine._pool is None


def test_a_failure_inside_a_piece_is_the_engines_error():
    """Past the input checks (called below them), ONNX Runtime itself fails in both pieces."""
    engine = OrtEngine(unet_path(), "unet", threads=2)
    feeds = unet_inputs(2) | {"encoder_hidden_states": np.zeros((2, 77, 31), np.float32)}  # 31 != 32 features
    with pytest.raises(EngineError, match="unet failed in ONNX Runtime"):
        engine._run(feeds)
    assert engine._pool is not None  # it was split
