"""sdrt's own CPU operators (runtime/engines/native_ops.py, runtime/engines/native/, export/passes/native_graph.py):
each kernel against a float64 numpy reference, the graph's function fallback against the kernel, the group-norm
rewrite, and the build cache's failure modes. The SD1 test bundle's U-Net uses both kernels (head size 8, a small
model), so every SD1 parity test runs through them too."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, TensorProto

from sdrt.export.passes import native_graph
from sdrt.runtime.engines import native_ops

# (batch, queries, keys, heads, head size): the compiled-in head sizes (8, 10, 16, 20, 32) and others, blocks of
# 16 queries that end ragged, one key, cross attention's 77 keys.
SHAPES = [(2, 64, 64, 4, 10), (2, 16, 77, 4, 20), (1, 5, 3, 2, 7), (3, 17, 33, 8, 20), (1, 40, 77, 2, 64),
          (1, 16, 16, 1, 8), (1, 33, 16, 2, 32), (2, 1, 1, 3, 16), (1, 31, 77, 5, 24)]


@pytest.fixture(autouse=True)
def fresh_status():
    native_ops.reset()
    yield
    native_ops.reset()


def attention_graph(width: int, heads: int, scale: float) -> bytes:
    node = helper.make_node("Attention", ["q", "k", "v"], ["out"], domain=native_graph.DOMAIN,
                            num_heads=heads, scale=scale)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", n + "len", width]) for n in "qkv"]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    native_graph.add_functions(model)  # the function ONNX Runtime falls back to, and the domains it needs
    return model.SerializeToString()


def session(model: bytes, library=None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if library is not None:
        opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def reference(q, k, v, heads, scale):
    split = lambda x: x.astype(np.float64).reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
    s = split(q) @ split(k).transpose(0, 1, 3, 2) * scale  # (B, heads, S, L)
    p = np.exp(s - s.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ split(v)
    return out.transpose(0, 2, 1, 3).reshape(q.shape)


def inputs(b, s, l, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return [(3 * rng.standard_normal((b, n, h * d))).astype(np.float32) for n in (s, l, l)]  # wide scores


@pytest.fixture(scope="module")
def library():
    native_ops.reset()
    path = native_ops.library()
    assert path is not None, native_ops.status().detail  # this machine has g++: the kernel must build
    return path


@pytest.mark.parametrize("b,s,l,h,d", SHAPES)
def test_the_kernel_matches_float64_attention_and_is_the_one_running(library, b, s, l, h, d):
    q, k, v = inputs(b, s, l, h, d)
    scale = d ** -0.5
    sess = session(attention_graph(h * d, h, scale), library)
    before = native_ops.calls(library, "attention")
    out = sess.run(None, {"q": q, "k": k, "v": v})[0]
    assert native_ops.calls(library, "attention") == before + 1  # sdrt's kernel ran, not the function body
    want = reference(q, k, v, h, scale)
    assert out.shape == q.shape and np.abs(out - want).max() <= 2e-5 * max(1.0, np.abs(want).max())


def test_without_the_library_the_graphs_function_runs_and_agrees(library):
    q, k, v = inputs(2, 64, 77, 4, 10, seed=1)
    model = attention_graph(40, 4, 10 ** -0.5)
    before = native_ops.calls(library, "attention")
    fallback = session(model).run(None, {"q": q, "k": k, "v": v})[0]
    assert native_ops.calls(library, "attention") == before  # ONNX Runtime's MultiHeadAttention ran instead
    native = session(model, library).run(None, {"q": q, "k": k, "v": v})[0]
    assert np.abs(fallback - native).max() <= 1e-5 * np.abs(fallback).max()  # float32 rounding apart


def test_a_call_the_exporter_never_writes_gets_nans_not_a_crash(library):
    q, k, v = inputs(1, 8, 8, 4, 10)  # width 40 over 3 heads does not divide
    out = session(attention_graph(40, 3, 0.3), library).run(None, {"q": q, "k": k, "v": v})[0]
    assert out.shape == q.shape and np.isnan(out).all()


def test_the_cpu_backend_runs_the_sd1_unet_on_the_kernels(pipes, library):
    from conftest import latents

    unet = pipes["sd1"].engines["unet"]
    assert unet.path.name == "model.cpu.onnx" and unet.native_ops
    before = {k: native_ops.calls(library, k) for k in ("attention", "group_norm")}
    pipes["sd1"].txt2img("a red cube", steps=2, latents=latents(1, seed=2))
    assert all(native_ops.calls(library, k) > n for k, n in before.items())


def test_the_switch_and_a_missing_compiler_turn_it_off_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv(native_ops.SWITCH, "0")
    assert native_ops.library() is None and "SDRT_NATIVE_OPS=0" in native_ops.status().detail
    native_ops.reset()
    monkeypatch.delenv(native_ops.SWITCH)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    status = native_ops.status()
    assert status.path is None and "no-such-compiler" in status.detail and "does not run" in status.detail


def test_a_compiler_that_fails_is_reported_and_nothing_half_built_is_left(monkeypatch, tmp_path):
    fake = tmp_path / "cxx"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\n"
                    "echo 'sdrt_ops.cpp:1: error: out of registers' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv(native_ops.CACHE_DIR, str(tmp_path / "cache"))
    status = native_ops.status()
    assert status.path is None and "out of registers" in status.detail and "building it failed" in status.detail
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial library in the cache


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("g++"),
                    reason="x86-64 instruction-set levels, told to g++")
def test_each_instruction_set_gets_a_build_of_its_own(monkeypatch, tmp_path):
    """The cache key is what -march=native means to the compiler: two CPUs of different kinds sharing a home
    folder (here: the compiler told that "native" is x86-64 baseline, then x86-64-v2) never share a build."""
    monkeypatch.setenv(native_ops.CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(Path(__file__).resolve().parents[1] / ".ci" / "emulated-cxx"))
    paths = []
    for level in ("x86-64", "x86-64-v2"):
        monkeypatch.setenv("EMULATED_MARCH", level)  # what the wrapper turns -march=native into
        native_ops.reset()
        status = native_ops.status()
        assert status.path is not None and status.detail.startswith("built"), status.detail
        paths.append(status.path)
    native_ops.reset()
    assert paths[0].parent != paths[1].parent and all(p.is_file() for p in paths)


PROBE = textwrap.dedent("""
    import json, sys
    from sdrt.runtime.engines import native_ops
    s = native_ops.status()
    print(json.dumps({"path": str(s.path) if s.path else None, "detail": s.detail}))
""")


def probe(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_build_is_cached_and_a_broken_cached_library_is_rebuilt(tmp_path):
    """Each step in its own process: a process that has loaded a library keeps it however the file changes."""
    env = {**os.environ, native_ops.CACHE_DIR: str(tmp_path)}
    first = probe(env)
    assert first["path"] and first["detail"].startswith("built")
    second = probe(env)
    assert second == {"path": first["path"], "detail": f"cached at {first['path']}"}
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"\x7fELF truncated")
    os.replace(broken, first["path"])  # a torn write, as a crash mid-copy would leave
    third = probe(env)
    assert third["path"] == first["path"] and third["detail"].startswith("built")


def test_two_processes_building_at_once_both_end_with_a_whole_library(tmp_path):
    env = {**os.environ, native_ops.CACHE_DIR: str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    assert results[0]["path"] == results[1]["path"] is not None
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [native_ops.LIBRARY]  # no temporary left


# --- GroupNorm / GroupNormSiLU -------------------------------------------------------------------------------

def group_norm_graph(channels: int, groups: int, silu: bool) -> bytes:
    op = "GroupNormSiLU" if silu else "GroupNorm"
    node = helper.make_node(op, ["x", "gamma", "beta"], ["out"], domain=native_graph.DOMAIN, groups=groups,
                            epsilon=1e-5)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [channels, 1, 1]) for n in ("gamma", "beta")]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    native_graph.add_functions(model)
    return model.SerializeToString()


def group_norm_reference(x, gamma, beta, groups, silu):
    n, c = x.shape[:2]
    g = x.astype(np.float64).reshape(n, groups, -1)
    y = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    y = y * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)
    return y / (1 + np.exp(-y)) if silu else y


# (N, C, H, W, groups): the embedded U-Net's, a spatial size that is not a multiple of 16, one pixel
NORMS = [(2, 40, 8, 8, 8), (1, 80, 4, 4, 8), (3, 6, 5, 7, 3), (1, 4, 1, 1, 2), (2, 32, 16, 16, 32)]


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("n,c,h,w,groups", NORMS)
def test_the_group_norm_kernel_matches_float64_and_its_function(library, n, c, h, w, groups, silu):
    rng = np.random.default_rng(c + h)
    x = (rng.standard_normal((n, c, h, w)) * 30 + 5).astype(np.float32)  # SiLU far into both tails
    gamma, beta = (rng.standard_normal((2, c, 1, 1)) * 2).astype(np.float32)
    model, feeds = group_norm_graph(c, groups, silu), {"x": x, "gamma": gamma, "beta": beta}
    before = native_ops.calls(library, "group_norm")
    out = session(model, library).run(None, feeds)[0]
    assert native_ops.calls(library, "group_norm") == before + 1
    want = group_norm_reference(x, gamma, beta, groups, silu)
    assert np.isfinite(out).all() and np.abs(out - want).max() <= 2e-5 * max(1.0, np.abs(want).max())
    fallback = session(model).run(None, feeds)[0]  # the function body: torch's ops
    assert native_ops.calls(library, "group_norm") == before + 1
    assert np.abs(fallback - out).max() <= 2e-5 * max(1.0, np.abs(want).max())


def test_a_group_count_that_does_not_divide_the_channels_gets_nans(library):
    x = np.ones((1, 6, 2, 2), np.float32)
    gamma = beta = np.ones((6, 1, 1), np.float32)
    out = session(group_norm_graph(6, 4, True), library).run(None, {"x": x, "gamma": gamma, "beta": beta})[0]
    assert np.isnan(out).all()


def test_torchs_group_norm_patterns_are_rewritten_and_compute_the_same(library, tmp_path):
    """norm1 + SiLU, norm2 alone, and norm3 + SiLU whose input is also read elsewhere: three rewrites; the graph
    computes what torch's export computed, with the library and without."""
    import onnx
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2, self.norm3 = (torch.nn.GroupNorm(4, 8) for _ in range(3))
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            h = self.conv(torch.nn.functional.silu(self.norm1(x)))
            h = self.conv(self.norm2(h)) + h
            return torch.nn.functional.silu(self.norm3(h)) * h

    torch.manual_seed(0)
    block = Block().eval()
    for norm in (block.norm1, block.norm2, block.norm3):
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 6, 6)
    path = tmp_path / "block.onnx"
    torch.onnx.export(block, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                      dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}}, dynamo=False)
    model = onnx.load(str(path))
    plain = model.SerializeToString()
    assert native_graph.fuse_group_norms(model) == 3
    ops = sorted(n.op_type for n in model.graph.node if n.domain == native_graph.DOMAIN)
    assert ops == ["GroupNorm", "GroupNormSiLU", "GroupNormSiLU"]
    assert not {"InstanceNormalization", "Sigmoid"} & {n.op_type for n in model.graph.node}
    feeds = {"x": x.numpy()}
    want = session(plain).run(None, feeds)[0]
    for lib in (library, None):
        got = session(model.SerializeToString(), lib).run(None, feeds)[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_library_others_could_have_written_is_rebuilt_and_a_shared_folder_refused(tmp_path):
    env = {**os.environ, native_ops.CACHE_DIR: str(tmp_path)}
    first = probe(env)
    library = first["path"]
    os.chmod(library, 0o777)  # group- and world-writable: someone else's library, for all sdrt can tell
    again = probe(env)
    assert again["path"] == library and again["detail"].startswith("built")
    assert oct(os.stat(library).st_mode & 0o777) == "0o755"
    os.chmod(os.path.dirname(library), 0o777)
    refused = probe(env)
    assert refused["path"] is None and "not yours alone" in refused["detail"]


def test_an_unwritable_cache_folder_turns_it_off_with_what_to_do(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(native_ops.CACHE_DIR, str(blocker / "cache"))
    status = native_ops.status()
    assert status.path is None and "SDRT_CACHE_DIR" in status.detail and "no cache folder" in status.detail
