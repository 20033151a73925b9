"""GPU check for any CUDA machine: `python benchmarks/gpu_check.py [--json OUT]`.

(a) sdrt's cuda-python layer (sdrt/runtime/engines/cuda.py): device and pinned allocation, copies both ways, a stream
    capture replayed many times equal to eager execution (kernels from CuPy or torch launched on OUR stream),
    a capture that must fail and leave the stream usable, and out-of-memory mapped to DeviceOutOfMemory.
(b) when TensorRT is importable: engines for a random-weight tiny model (tests/tiny_models.py) and the
    embedded model, images against ONNX Runtime on the CPU (fp32: max difference <= 2/255; fp16: PSNR >= 35 dB),
    each stage timed with CUDA events with and without CUDA graphs, and peak device memory; then the tiny model
    with a tiny random ControlNet (`sdrt build --controlnet`: the residual U-Net's and the ControlNet's engines),
    its image against ONNX Runtime's by the same bars.
Prints a JSON summary; exits 0 when every check passed, 1 when one failed, 2 (one line) when there is no GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replays", type=int, default=1000, help="graph replays compared with eager execution")
    p.add_argument("--elements", type=int, default=1 << 22, help="float32 elements in the test buffers")
    p.add_argument("--skip-trt", action="store_true", help="only part (a), even when TensorRT is installed")
    p.add_argument("--bundle", action="append", type=Path, default=[],
                   help="a bundle for part (b) (repeatable); default: a random-weight tiny model and the "
                        "embedded model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path, help="also write the summary here")
    return p.parse_args(argv)


def kernels(stream_ptr: int):
    """(name, fn(src_ptr, dst_ptr, n)) computing dst = 2·sin(src) + src on our stream, or (None, None)."""
    try:
        import cupy as cp

        ext = cp.cuda.ExternalStream(stream_ptr)

        def wrap(ptr, n):
            mem = cp.cuda.UnownedMemory(ptr, n * 4, owner=None)
            return cp.ndarray((n,), cp.float32, cp.cuda.MemoryPointer(mem, 0))

        def run(src, dst, n):
            a, b = wrap(src, n), wrap(dst, n)
            with ext:
                cp.sin(a, out=b)
                cp.multiply(b, 2, out=b)
                cp.add(b, a, out=b)
        return f"cupy {cp.__version__}", run
    except ImportError:
        pass
    try:
        import torch

        ext = torch.cuda.ExternalStream(stream_ptr)

        class Ptr:
            def __init__(self, ptr, n):
                self.__cuda_array_interface__ = {"shape": (n,), "typestr": "<f4", "data": (ptr, False),
                                                 "version": 2, "strides": None}

        def run(src, dst, n):
            with torch.cuda.stream(ext):
                a, b = torch.as_tensor(Ptr(src, n), device="cuda"), torch.as_tensor(Ptr(dst, n), device="cuda")
                torch.sin(a, out=b)
                b.mul_(2).add_(a)
        return f"torch {torch.__version__}", run
    except (ImportError, RuntimeError):
        return None, None


class Events:
    """Elapsed GPU time between two points of our stream (cudaEventRecord / cudaEventElapsedTime)."""

    def __init__(self, rt, stream):
        from sdrt.runtime.engines.cuda import check

        self.rt, self.stream, self.check = rt, stream, check
        self.start = check(rt, rt.cudaEventCreate(), "cudaEventCreate")
        self.end = check(rt, rt.cudaEventCreate(), "cudaEventCreate")

    def __enter__(self):
        self.check(self.rt, self.rt.cudaEventRecord(self.start, self.stream.handle), "cudaEventRecord")
        return self

    def __exit__(self, *exc):
        self.check(self.rt, self.rt.cudaEventRecord(self.end, self.stream.handle), "cudaEventRecord")
        self.check(self.rt, self.rt.cudaEventSynchronize(self.end), "cudaEventSynchronize")
        self.ms = float(self.check(self.rt, self.rt.cudaEventElapsedTime(self.start, self.end), "cudaEventElapsedTime"))


def check_cuda_layer(args, rt, gpu) -> dict:
    from sdrt.errors import DeviceOutOfMemory
    from sdrt.runtime.engines import cuda

    n, out = args.elements, {"gpu": gpu.name, "compute_capability": gpu.compute_capability}
    stream = cuda.Stream(rt)
    dev_a, dev_b = cuda.DeviceBuffer(4 * n, rt), cuda.DeviceBuffer(4 * n, rt)
    host_in, host_out = cuda.PinnedBuffer(4 * n, rt), cuda.PinnedBuffer(4 * n, rt)
    x_in, x_out = host_in.view(np.float32, (n,)), host_out.view(np.float32, (n,))
    rng = np.random.default_rng(0)
    x_in[:] = rng.standard_normal(n, dtype=np.float32)
    cuda.copy_htod(rt, dev_a.ptr, host_in.ptr, 4 * n, stream)
    cuda.copy_dtoh(rt, host_out.ptr, dev_a.ptr, 4 * n, stream)
    stream.synchronize()
    out["copies_roundtrip_equal"] = bool(np.array_equal(x_in, x_out))
    name, kernel = kernels(stream.ptr)
    out["kernels"] = name or "none (install cupy or torch): graph checked on copies only"

    def work():  # what the graph holds: one copy in, the kernel, one copy out
        cuda.copy_htod(rt, dev_a.ptr, host_in.ptr, 4 * n, stream)
        if kernel:
            kernel(dev_a.ptr, dev_b.ptr, n)
        cuda.copy_dtoh(rt, host_out.ptr, (dev_b if kernel else dev_a).ptr, 4 * n, stream)

    work()
    stream.synchronize()
    eager = x_out.copy()
    want = (2 * np.sin(x_in) + x_in) if kernel else x_in
    out["eager_matches_numpy"] = bool(np.allclose(eager, want, rtol=1e-5, atol=1e-5))
    graph = cuda.Graph(stream, work, rt)
    mismatches, t_graph, t_eager = 0, 0.0, 0.0
    for i in range(args.replays):
        x_in[:] = rng.standard_normal(n, dtype=np.float32) if i % 100 == 0 else x_in * np.float32(0.5)
        with Events(rt, stream) as ev:
            graph.launch()
        t_graph += ev.ms
        replayed = x_out.copy()
        if i % 50 == 0:  # eager on the same input, bit for bit (a subset: eager is what we want to avoid)
            with Events(rt, stream) as ev:
                work()
            t_eager += ev.ms
            mismatches += not np.array_equal(replayed, x_out)
        mismatches += not np.allclose(replayed, (2 * np.sin(x_in) + x_in) if kernel else x_in, rtol=1e-5, atol=1e-5)
    out.update(graph_replays=args.replays, graph_mismatches=int(mismatches),
               graph_ms_per_replay=round(t_graph / args.replays, 4),
               eager_ms_per_run=round(t_eager / max(1, args.replays // 50), 4))
    graph.close()
    try:  # a synchronize inside a capture is illegal: the capture must fail and leave the stream usable
        cuda.Graph(stream, lambda: stream.synchronize(), rt)
        out["bad_capture_refused"] = False
    except cuda.CaptureFailed as e:
        work()
        stream.synchronize()
        want = (2 * np.sin(x_in) + x_in) if kernel else x_in
        out["bad_capture_refused"] = bool(np.allclose(x_out, want, rtol=1e-5, atol=1e-5))
        out["bad_capture_message"] = str(e)
    try:
        cuda.DeviceBuffer(gpu.total_memory + 2**30, rt)
        out["oom_typed"] = False
    except DeviceOutOfMemory as e:
        out["oom_typed"], out["oom_message"] = "GiB free of" in str(e), str(e)
    for b in (dev_a, dev_b, host_in, host_out):
        b.close()
    stream.close()
    out["passed"] = all(out[k] for k in ("copies_roundtrip_equal", "eager_matches_numpy", "bad_capture_refused",
                                         "oom_typed")) and mismatches == 0
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _stage_times(pipe, rt, stream, steps: int) -> dict:
    """ms per call of each stage on the TensorRT engines, from CUDA events on their stream."""
    from sdrt.runtime import names

    m, times = pipe.manifest, {}
    h, w = m.default_height // m.vae_scale_factor, m.default_width // m.vae_scale_factor
    d = m.text_hidden_size
    feeds = {names.TEXT_ENCODER: {names.INPUTS_EMBEDS: np.zeros((2, 77, d), np.float32)},
             names.UNET: {names.SAMPLE: np.zeros((2, m.unet_in_channels, h, w), np.float32),
                          names.TIMESTEP: np.full(2, 500, np.float32),
                          names.ENCODER_HIDDEN_STATES: np.zeros((2, 77, d), np.float32)},
             names.VAE_DECODER: {names.LATENT_SAMPLE: np.zeros((1, m.latent_channels, h, w), np.float32)}}
    for comp, f in feeds.items():
        pipe.engines[comp](**f)  # warm-up (and capture)
        runs = steps if comp == names.UNET else 5
        with Events(rt, stream) as ev:
            for _ in range(runs):
                pipe.engines[comp](**f)
        times[comp] = round(ev.ms / runs, 3)
    return times


def check_tensorrt(args, rt, work: Path) -> dict:
    from sdrt.export.build import build_engines
    from sdrt.runtime.engines import cuda
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.engines.trt_backend import load_tensorrt_engines

    bundles = list(args.bundle)
    if not bundles:
        from sdrt.embedded import BUNDLE
        from tiny_models import build_model
        from sdrt.export import export_bundle

        export_bundle(build_model(work / "tiny", "sd1"), work / "tiny-bundle", log=lambda *_: None)
        bundles.append(work / "tiny-bundle")
        if BUNDLE.is_dir():
            bundles.append(BUNDLE)
    results, passed = {}, True
    if not args.bundle:
        results["controlnet"] = check_controlnet(args, work, work / "tiny", work / "tiny-bundle")
        passed &= results["controlnet"]["passed"]
    for bundle in bundles:
        ref = Pipeline.load(bundle)
        kw = dict(steps=args.steps, seed=1, guidance=7.5, watermark=False)
        want = np.asarray(ref.txt2img("a red circle on a blue background", **kw)[0])
        for precision in ("fp32", "fp16"):
            engines = work / f"engines-{precision}"
            free0, total = cuda.mem_info_or_none(rt)
            started = time.perf_counter()
            build_engines(bundle, precision=precision, engines_dir=engines, log=lambda *_: None)
            build_s = time.perf_counter() - started
            row = {"build_s": round(build_s, 1)}
            for use_graph in (True, False):
                pipe = Pipeline.load(bundle)
                comps, session = load_tensorrt_engines(bundle, pipe.manifest, engines, use_graph=use_graph)
                pipe.engines.update(comps)
                got = np.asarray(pipe.txt2img("a red circle on a blue background", **kw)[0])
                free1, _ = cuda.mem_info_or_none(rt)
                tag = "graph" if use_graph else "eager"
                row[f"ms_per_call_{tag}"] = _stage_times(pipe, rt, session.stream, args.steps)
                row["peak_device_gib"] = round(max(row.get("peak_device_gib", 0), (free0 - free1) / 2**30), 3)
                diff = np.abs(got.astype(int) - want.astype(int))
                row[f"max_diff_{tag}"], row[f"psnr_{tag}"] = int(diff.max()), round(_psnr(got, want), 2)
                ok = row[f"max_diff_{tag}"] <= 2 if precision == "fp32" else row[f"psnr_{tag}"] >= 35
                row[f"passed_{tag}"] = bool(ok)
                passed &= bool(ok)
                session.close()
            results[f"{Path(bundle).name}/{precision}"] = row
    return {"bundles": results, "passed": passed}


def check_controlnet(args, work: Path, model: Path, bundle: Path) -> dict:
    """The tiny model with a random ControlNet (tests/controlnet_models.py) on TensorRT against ONNX Runtime."""
    from controlnet_models import build_controlnet
    from PIL import Image

    import sdrt
    from sdrt.export import export_controlnet
    from sdrt.export.build import build_engines

    export_controlnet(build_controlnet(model, work / "cn", seed=3), work / "cn-bundle", height=64, width=64,
                      log=lambda *_: None)
    control = Image.fromarray(((np.indices((64, 64)).sum(0) // 8) % 2 * 255).astype(np.uint8)).convert("RGB")
    kw = dict(steps=args.steps, seed=1, guidance=7.5, watermark=False)

    def image(backend: str, engines=None):
        pipe = sdrt.Pipeline.load(bundle, backend=backend, engines=engines)
        net = sdrt.ControlNet.load(work / "cn-bundle", backend=backend, engines=engines)
        out = pipe.txt2img("a red circle on a blue background", controls=[sdrt.Control(net, control)], **kw)[0]
        net.close()
        return np.asarray(out)

    want, row, passed = image("onnxruntime"), {}, True
    for precision in ("fp32", "fp16"):
        engines = work / f"engines-cn-{precision}"
        build_engines(bundle, precision=precision, engines_dir=engines, controlnets=[work / "cn-bundle"],
                      log=lambda *_: None)
        got = image("tensorrt", engines)
        diff = np.abs(got.astype(int) - want.astype(int))
        row[precision] = {"max_diff": int(diff.max()), "psnr": round(_psnr(got, want), 2)}
        ok = row[precision]["max_diff"] <= 2 if precision == "fp32" else row[precision]["psnr"] >= 35
        row[precision]["passed"] = bool(ok)
        passed &= bool(ok)
    return {**row, "passed": passed}


def main(argv=None) -> int:
    args = parse_args(argv)
    from sdrt.errors import SdrtError
    from sdrt.runtime.engines import cuda

    try:
        rt = cuda.runtime()
        gpu = cuda.device_info(rt)
    except SdrtError as e:
        print(f"gpu_check: no usable GPU here: {e}", file=sys.stderr)
        return 2
    summary = {"cuda_layer": check_cuda_layer(args, rt, gpu)}
    try:
        import tensorrt  # noqa: F401
        have_trt = not args.skip_trt
    except ImportError:
        have_trt = False
        summary["tensorrt"] = "not installed: part (b) skipped"
    if have_trt:
        with tempfile.TemporaryDirectory(prefix="sdrt-gpu-check-") as work:
            summary["tensorrt"] = check_tensorrt(args, rt, Path(work))
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    parts = [summary["cuda_layer"]] + ([summary["tensorrt"]] if isinstance(summary.get("tensorrt"), dict) else [])
    return 0 if all(p["passed"] for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
