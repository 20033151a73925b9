"""The engine store, engine keys and profile shapes: everything of the TensorRT path that needs no GPU.

No TensorRT here: plans are arbitrary bytes, which is all the store sees of them."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdrt.errors import EngineNotBuilt, InvalidRequest, StaleEngine
from sdrt.runtime import names
from sdrt.runtime.engines.store import (EngineStore, GpuInfo, engine_manifest, find_store, gpu_key, model_hash,
                                       onnx_digests)
from sdrt.runtime.manifest import GraphSpec, Manifest, TensorSpec
from sdrt.runtime.engines.trt_profiles import default_sizes, engine_specs, fit

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "550.54.15", 80 * 2**30)
TRT = "10.8.0.43"
TESTS = Path(__file__).parent


def fake_manifest(family: str = "sd1") -> Manifest:
    """A bundle manifest as `sdrt export` writes it for SD 1.5 (sd1) or SD 2.1-v (sd2v); no files needed."""
    d = 768 if family == "sd1" else 1024
    size = 512 if family == "sd1" else 768
    t = lambda n, *shape: TensorSpec(n, "float32", shape)  # noqa: E731
    graphs = {
        names.TEXT_ENCODER: GraphSpec("text_encoder/model.onnx", (t(names.INPUTS_EMBEDS, "batch", 77, d),),
                                      (t(names.LAST_HIDDEN_STATE, "batch", "s", d),
                                       t(names.HIDDEN_STATES, "batch", 13, "s", d))),
        names.UNET: GraphSpec("unet/model.onnx", (t(names.SAMPLE, "batch", 4, "height", "width"),
                                                  t(names.TIMESTEP, "batch"),
                                                  t(names.ENCODER_HIDDEN_STATES, "batch", "tokens", d)),
                              (t(names.OUT_SAMPLE, "batch", 4, "height", "width"),)),
        names.VAE_DECODER: GraphSpec("vae_decoder/model.onnx", (t(names.LATENT_SAMPLE, "batch", 4, "height", "width"),),
                                     (t(names.SAMPLE, "batch", 3, "height", "width"),)),
        names.VAE_ENCODER: GraphSpec("vae_encoder/model.onnx", (t(names.SAMPLE, "batch", 3, "height", "width"),),
                                     (t(names.LATENT_PARAMETERS, "batch", 8, "height", "width"),)),
    }
    files = {f"{c}/model.onnx": f"{i}" * 64 for i, c in enumerate(graphs)}
    files["unet/model.onnx_data"] = "e" * 64
    return Manifest(graphs=graphs, latent_channels=4, unet_in_channels=4, vae_scaling_factor=0.18215,
                    vae_scale_factor=8, prediction_type="epsilon" if family == "sd1" else "v_prediction",
                    default_height=size, default_width=size, text_hidden_size=d, tokenizer_max_length=77,
                    tokenizer_pad_id=49407, files=files, source_hash="ab" * 32)


def make_store(root: Path, gpu: GpuInfo = H100, trt: str = TRT, manifest: Manifest | None = None) -> EngineStore:
    return EngineStore(root, Path("/bundles/sd15"), manifest or fake_manifest(), gpu, trt)


def unet_spec(manifest=None, batch=1, size=512):
    return next(s for s in engine_specs(manifest or fake_manifest(), [size], batch) if s.component == names.UNET)


def fake_build(store: EngineStore, spec, plan: bytes = b"PLAN" * 1000):
    import hashlib

    def build():
        m = engine_manifest(store.identity(spec), hashlib.sha256(plan).hexdigest(), len(plan), spec.precision,
                            spec.precision, {"workspace_gb": None})
        return plan, m
    return build


# -- keys and profile shapes ------------------------------------------------------------------------------
def test_gpu_key_names_gpu_compute_capability_and_tensorrt():
    assert gpu_key(H100, TRT) == "nvidia-h100-80gb-hbm3_sm90_trt10.8.0.43"
    odd = GpuInfo("NVIDIA GeForce RTX 4090 / (Laptop)", "8.9")
    assert gpu_key(odd, "10.12.0.36") == "nvidia-geforce-rtx-4090-laptop_sm89_trt10.12.0.36"
    assert "/" not in gpu_key(GpuInfo("../../etc", "9.0"), "../x")


def test_store_folder_is_model_hash_then_gpu_key(tmp_path):
    store = make_store(tmp_path)
    assert store.dir == tmp_path / ("ab" * 8) / "nvidia-h100-80gb-hbm3_sm90_trt10.8.0.43"
    unhashed = fake_manifest()
    unhashed.source_hash = None
    with pytest.raises(EngineNotBuilt, match="sdrt export"):
        model_hash(unhashed, Path("b"))


def test_default_sizes_512_for_sd1_and_768_for_v_prediction_sd2():
    assert default_sizes(fake_manifest("sd1")) == [(512, 512)]
    assert default_sizes(fake_manifest("sd2v")) == [(768, 768)]


def test_profile_shapes_512_batch_1():
    specs = {s.key: s.input_shapes for s in engine_specs(fake_manifest(), [512], batch=1)}
    assert specs == {
        "text_encoder-b2-t77-fp16": {names.INPUTS_EMBEDS: (2, 77, 768)},
        "unet-512x512-b2-t77-fp16": {names.SAMPLE: (2, 4, 64, 64), names.TIMESTEP: (2,),
                                     names.ENCODER_HIDDEN_STATES: (2, 77, 768)},
        "vae_decoder-512x512-b1-fp16": {names.LATENT_SAMPLE: (1, 4, 64, 64)},
        "vae_encoder-512x512-b1-fp16": {names.SAMPLE: (1, 3, 512, 512)},
    }


def test_profile_shapes_768_batch_4_two_chunks_fp32():
    specs = {s.component: s for s in engine_specs(fake_manifest("sd2v"), [(768, 640)], batch=4, precision="fp32",
                                                  chunks=2)}
    assert specs[names.UNET].key == "unet-768x640-b8-t154-fp32"
    assert specs[names.UNET].input_shapes == {names.SAMPLE: (8, 4, 96, 80), names.TIMESTEP: (8,),
                                              names.ENCODER_HIDDEN_STATES: (8, 154, 1024)}
    assert specs[names.TEXT_ENCODER].input_shapes == {names.INPUTS_EMBEDS: (4, 77, 1024)}  # 2 prompts x 2 chunks
    assert specs[names.VAE_DECODER].input_shapes == {names.LATENT_SAMPLE: (4, 4, 96, 80)}


def test_several_sizes_share_one_text_encoder_engine():
    keys = [s.key for s in engine_specs(fake_manifest(), [512, 768, 512], batch=1)]
    assert keys.count("text_encoder-b2-t77-fp16") == 1
    assert "unet-768x768-b2-t77-fp16" in keys and len(keys) == 7


@pytest.mark.parametrize("kwargs, match", [
    ({"sizes": [500]}, "multiple of 8"), ({"sizes": [(512, 0)]}, "multiple of 8"), ({"sizes": []}, "at least one"),
    ({"sizes": [512], "batch": 0}, "batch"), ({"sizes": [512], "precision": "int8"}, "precision"),
    ({"sizes": [512], "chunks": 9}, "chunks"),
])
def test_bad_build_requests_are_typed_errors(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        engine_specs(fake_manifest(), **kwargs)


def test_fit_pads_missing_batch_rows_and_refuses_other_shapes():
    engine = {names.SAMPLE: (2, 4, 64, 64), names.TIMESTEP: (2,)}
    assert fit(engine, {names.SAMPLE: (2, 4, 64, 64), names.TIMESTEP: (2,)}) == 0
    assert fit(engine, {names.SAMPLE: (1, 4, 64, 64), names.TIMESTEP: (1,)}) == 1  # guidance off
    assert fit(engine, {names.SAMPLE: (4, 4, 64, 64), names.TIMESTEP: (4,)}) is None  # more rows than built
    assert fit(engine, {names.SAMPLE: (2, 4, 96, 96), names.TIMESTEP: (2,)}) is None  # another size
    assert fit(engine, {names.SAMPLE: (1, 4, 64, 64), names.TIMESTEP: (2,)}) is None  # inconsistent batch
    assert fit({"t": (), "x": (2, 3)}, {"t": (), "x": (1, 3)}) == 1  # a scalar timestep has no batch


# -- manifests, saving and loading --------------------------------------------------------------------------
def test_saved_engine_loads_and_its_manifest_says_what_it_is(tmp_path):
    store, spec = make_store(tmp_path), unet_spec()
    m, built = store.ensure(store.identity(spec), fake_build(store, spec))
    assert built
    plan, loaded = store.load_plan(store.identity(spec))
    assert plan == b"PLAN" * 1000 and loaded == m
    assert m["shapes"] == {names.SAMPLE: [2, 4, 64, 64], names.TIMESTEP: [2], names.ENCODER_HIDDEN_STATES: [2, 77, 768]}
    assert m["tensorrt"] == TRT and m["gpu"]["name"] == H100.name and m["gpu"]["driver"] == "550.54.15"
    assert m["bundle"]["onnx"] == {"unet/model.onnx": "1" * 64, "unet/model.onnx_data": "e" * 64}
    assert m["plan"]["file"] == "unet-512x512-b2-t77-fp16.plan" and len(m["plan"]["sha256"]) == 64
    assert json.loads(store.manifest_path(spec.key).read_text()) == m
    assert onnx_digests(fake_manifest(), names.UNET) == m["bundle"]["onnx"]


def test_second_ensure_reuses_without_building(tmp_path):
    store, spec = make_store(tmp_path), unet_spec()
    store.ensure(store.identity(spec), fake_build(store, spec))
    _, built = store.ensure(store.identity(spec), lambda: pytest.fail("must not rebuild"))
    assert not built


def test_find_store_only_when_engines_exist(tmp_path):
    assert find_store(tmp_path, Path("b"), fake_manifest(), H100, TRT) is None
    store, spec = make_store(tmp_path), unet_spec()
    store.ensure(store.identity(spec), fake_build(store, spec))
    assert find_store(tmp_path, Path("b"), fake_manifest(), H100, TRT).built_keys() == [spec.key]


@pytest.mark.parametrize("change, what", [
    ({"gpu": GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")}, "GPU"),
    ({"gpu": GpuInfo(H100.name, "8.9")}, "compute capability"),
    ({"trt": "10.9.0.34"}, "TensorRT"),
])
def test_engine_for_another_gpu_or_tensorrt_is_refused(tmp_path, change, what):
    built = make_store(tmp_path)
    spec = unet_spec()
    built.ensure(built.identity(spec), fake_build(built, spec))
    other = make_store(tmp_path, change.get("gpu", H100), change.get("trt", TRT))
    other.dir.mkdir(parents=True, exist_ok=True)  # copied engines: same files under the other machine's key
    for f in built.dir.iterdir():
        (other.dir / f.name).write_bytes(f.read_bytes())
    with pytest.raises(StaleEngine, match=f"{what}.*run `sdrt build /bundles/sd15`"):
        other.load_plan(other.identity(spec))


def test_engine_of_another_bundle_or_changed_graph_is_refused(tmp_path):
    store, spec = make_store(tmp_path), unet_spec()
    store.ensure(store.identity(spec), fake_build(store, spec))
    changed = fake_manifest()
    changed.files["unet/model.onnx_data"] = "f" * 64  # same model hash, other weights (a re-export)
    again = make_store(tmp_path, manifest=changed)
    with pytest.raises(StaleEngine, match="graph files.*sdrt build"):
        again.load_plan(again.identity(spec))
    assert not again.is_valid(again.identity(spec))


def test_wrong_plan_hash_is_refused(tmp_path):
    store, spec = make_store(tmp_path), unet_spec()
    store.ensure(store.identity(spec), fake_build(store, spec))
    store.plan_path(spec.key).write_bytes(b"PLAN" * 999 + b"XXXX")
    with pytest.raises(StaleEngine, match="sha256.*sdrt build"):
        store.load_plan(store.identity(spec))
    _, built = store.ensure(store.identity(spec), fake_build(store, spec))  # a build replaces it
    assert built and store.load_plan(store.identity(spec))[0] == b"PLAN" * 1000


def test_missing_or_corrupt_manifest(tmp_path):
    store, spec = make_store(tmp_path), unet_spec()
    with pytest.raises(EngineNotBuilt, match="no TensorRT engine unet-512x512-b2-t77-fp16.*sdrt build"):
        store.load_plan(store.identity(spec))
    store.dir.mkdir(parents=True)
    store.manifest_path(spec.key).write_text("{not json")
    with pytest.raises(StaleEngine, match="unreadable.*sdrt build"):
        store.load_plan(store.identity(spec))


def test_unreadable_timing_cache_is_ignored_with_a_warning(tmp_path):
    store = make_store(tmp_path)
    assert store.read_timing_cache() is None
    (store.dir / "timing.cache").mkdir(parents=True)  # a folder where the cache should be: unreadable
    with pytest.warns(UserWarning, match="timing cache .* unreadable"):
        assert store.read_timing_cache() is None
    (store.dir / "timing.cache").rmdir()
    store.write_timing_cache(b"cache")
    assert store.read_timing_cache() == b"cache"


# -- two builds at once, and builds that die ---------------------------------------------------------------
def _race(root: str, log: str, barrier) -> None:
    store, spec = make_store(Path(root)), unet_spec()

    def build():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that the other process arrives while this one builds
        return fake_build(store, spec)()

    barrier.wait()
    m, built = store.ensure(store.identity(spec), build)
    with open(log + ".done", "a") as f:
        f.write(json.dumps({"built": built, "sha": m["plan"]["sha256"]}) + "\n")


def test_two_processes_building_one_engine_build_it_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, log = ctx.Barrier(2), str(tmp_path / "builds")
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "engines"), log, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(Path(log).read_text().split()) == 1  # one build ...
    done = [json.loads(line) for line in Path(log + ".done").read_text().splitlines()]
    assert sorted(d["built"] for d in done) == [False, True]  # ... and the second waited, then reused it
    assert done[0]["sha"] == done[1]["sha"]


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_engine_store import make_store, unet_spec, fake_build
    from sdrt.runtime import fsutil
    from sdrt.runtime.engines import store as engine_store
    stage = {stage!r}
    def hang(*args, **kwargs):
        print("hanging", flush=True)
        time.sleep(60)
    if stage == "plan":
        fsutil.os.fsync = hang  # dies with the plan in a temp file, before its rename
    else:
        engine_store._write_manifest = hang  # dies after the plan is in place, before the manifest
    store, spec = make_store(Path({root!r})), unet_spec()
    store.ensure(store.identity(spec), fake_build(store, spec))
""")


@pytest.mark.parametrize("stage", ["plan", "manifest"])
def test_a_killed_build_leaves_nothing_that_loads(tmp_path, stage):
    root = tmp_path / "engines"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS), stage=stage, root=str(root))],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "hanging"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    store, spec = make_store(root), unet_spec()
    leftovers = [p.name for p in store.dir.iterdir() if p.name.endswith(".tmp")]
    assert bool(leftovers) == (stage == "plan")
    assert store.plan_path(spec.key).exists() == (stage == "manifest")
    with pytest.raises(EngineNotBuilt, match="sdrt build"):
        store.load_plan(store.identity(spec))  # neither a temp file nor a plan without manifest loads
    _, built = store.ensure(store.identity(spec), fake_build(store, spec))  # the lock died with the child
    assert built and not [p for p in store.dir.iterdir() if p.name.endswith(".tmp")]
    assert store.load_plan(store.identity(spec))[0] == b"PLAN" * 1000
