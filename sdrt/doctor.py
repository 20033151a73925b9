"""`sdrt doctor`: what this machine can run (GPU, driver, CUDA, TensorRT, ONNX Runtime, sdrt's CPU operators),
and the one-line refusal of `sdrt build` where it can't. Never raises: every probe reports what it found or why not.
"""
from __future__ import annotations

import importlib
import shutil
import subprocess

from .errors import MissingDependency, SdrtError

GPU_EXTRA = "pip install 'sdrt[gpu]'"
HINTS = {
    "gpu": "no NVIDIA GPU or driver: sdrt runs on the CPU with ONNX Runtime; the TensorRT path needs an NVIDIA "
           "GPU with its driver",
    "cuda-python": f"cuda-python is missing: {GPU_EXTRA} (or pip install cuda-python)",
    "tensorrt": f"TensorRT is missing: {GPU_EXTRA} (or pip install tensorrt; TensorRT 10 or newer)",
    "onnxruntime-gpu": "ONNX Runtime has no CUDA provider: pip install onnxruntime-gpu (in place of onnxruntime) "
                       "to run on the GPU without TensorRT",
}
MIN_TRT = (8, 6)  # execute_async_v3 and named tensors; sdrt is written and tested against 10 and 11


def _version(module: str) -> tuple[str | None, str | None]:
    """(version, None) or (None, why it can't be imported)."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer.so) is an ImportError or OSError
        return None, f"{type(e).__name__}: {e}"
    return str(getattr(mod, "__version__", "unknown")), None


def _gpu_via_cuda_python() -> dict:
    from .runtime.engines import cuda

    rt = cuda.runtime()
    gpu = cuda.device_info(rt)
    runtime_version = cuda.check(rt, rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    return {"found": True, "name": gpu.name, "compute_capability": gpu.compute_capability,
            "cuda_driver": gpu.driver, "cuda_runtime": cuda.cuda_version_text(runtime_version),
            "memory_gib": round(gpu.total_memory / 2**30, 1), "via": "cuda-python"}


def _gpu_via_nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"found": False, "reason": "cuda-python is not installed and nvidia-smi is not on PATH"}
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"found": False, "reason": f"nvidia-smi failed: {e}"}
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != 4:
        return {"found": False, "reason": f"nvidia-smi found no GPU ({(out.stderr or out.stdout).strip()[:200]})"}
    name, cc, driver, mem = fields
    return {"found": True, "name": name, "compute_capability": cc, "driver": driver,
            "memory_gib": round(float(mem) / 1024, 1) if mem.replace(".", "").isdigit() else None,
            "via": "nvidia-smi"}


def gpu_report() -> dict:
    """The first GPU: through cuda-python when installed, else nvidia-smi; {"found": False, "reason"} if none."""
    try:
        report = _gpu_via_cuda_python()
    except SdrtError as e:  # no cuda-python, no driver, no device: try nvidia-smi, keep the first reason
        report = _gpu_via_nvidia_smi()
        if not report["found"] and "needs cuda-python" not in str(e):
            report["reason"] = str(e)
        return report
    smi = _gpu_via_nvidia_smi()
    if smi.get("found"):
        report["driver"] = smi.get("driver")  # the NVIDIA driver's version; CUDA's is cuda_driver
    return report


def onnxruntime_report() -> dict:
    version, why = _version("onnxruntime")
    if version is None:
        return {"version": None, "reason": why, "providers": []}
    import onnxruntime

    return {"version": version, "providers": list(onnxruntime.get_available_providers())}


def native_ops_report() -> dict:
    """sdrt's CPU operators for ONNX Runtime (runtime/engines/native_ops.py): built or found here, or why not."""
    from .runtime.engines import native_ops

    try:
        status = native_ops.status()
    except Exception as e:  # noqa: BLE001 - doctor reports, never raises
        return {"on": False, "detail": f"{type(e).__name__}: {e}"}
    return {"on": status.path is not None, "detail": status.detail}


def doctor() -> tuple[dict, str]:
    """(report, text): everything found, and one line per missing piece saying how to get it."""
    trt, trt_why = _version("tensorrt")
    cp, cp_why = _version("cuda.bindings")
    if cp is None:
        cp, cp_why2 = _version("cuda")
        cp = cp if cp_why2 is None and cp != "unknown" else None
    report = {"gpu": gpu_report(), "tensorrt": {"version": trt, "reason": trt_why},
              "cuda_python": {"version": cp, "reason": cp_why}, "onnxruntime": onnxruntime_report(),
              "native_ops": native_ops_report()}
    hints = []
    if not report["gpu"]["found"]:
        hints.append(HINTS["gpu"])
    if cp is None:
        hints.append(HINTS["cuda-python"])
    if trt is None:
        hints.append(HINTS["tensorrt"])
    if report["gpu"]["found"] and "CUDAExecutionProvider" not in report["onnxruntime"]["providers"]:
        hints.append(HINTS["onnxruntime-gpu"])
    report["hints"] = hints
    report["can_build"] = bool(report["gpu"]["found"] and trt and cp)
    return report, _text(report)


def _text(r: dict) -> str:
    g = r["gpu"]
    lines = [f"gpu          {g['name']} (compute capability {g['compute_capability']}, {g.get('memory_gib')} GiB)"
             if g["found"] else f"gpu          none ({g.get('reason')})"]
    if g["found"]:
        lines.append(f"driver       {g.get('driver') or 'unknown'}; CUDA driver {g.get('cuda_driver', 'unknown')}, "
                     f"runtime {g.get('cuda_runtime', 'unknown')}")
    lines.append(f"cuda-python  {r['cuda_python']['version'] or 'not installed'}")
    lines.append(f"tensorrt     {r['tensorrt']['version'] or 'not installed'}")
    ort = r["onnxruntime"]
    lines.append(f"onnxruntime  {ort['version'] or 'not installed'}; providers: {', '.join(ort['providers']) or 'none'}")
    ops = r["native_ops"]
    lines.append(f"sdrt ops     {'on' if ops['on'] else 'off'} ({ops['detail']})")
    lines.append("sdrt build   " + ("available" if r["can_build"] else "not available here"))
    lines += [f"hint         {h}" for h in r["hints"]]
    return "\n".join(lines)


def build_preflight():
    """(tensorrt module, cuda runtime bindings, GpuInfo) when `sdrt build` can run here; else one
    MissingDependency line naming everything missing."""
    problems = []
    try:
        from .runtime.engines import cuda

        rt = cuda.runtime()
        gpu = cuda.device_info(rt)
    except MissingDependency as e:
        rt = gpu = None
        if "cuda-python" in str(e):
            problems.append("no cuda-python")
        smi = _gpu_via_nvidia_smi() if "cuda-python" in str(e) else {"found": False}
        if not smi["found"]:
            problems.insert(0, "no NVIDIA GPU (no CUDA device or driver)")
    trt_version, _ = _version("tensorrt")
    if trt_version is None:
        problems.append("no TensorRT")
    elif tuple(int(p) for p in trt_version.split(".")[:2] if p.isdigit()) < MIN_TRT:
        problems.append(f"TensorRT {trt_version}, older than {MIN_TRT[0]}.{MIN_TRT[1]}")
    if problems:
        raise MissingDependency(f"sdrt build cannot run here: {', '.join(problems)}. It needs an NVIDIA GPU with "
                                f"its driver, TensorRT >= 10 and cuda-python ({GPU_EXTRA}); `sdrt doctor` shows "
                                "what this machine has")
    import tensorrt

    return tensorrt, rt, gpu
