"""`sdrt bench`: what this machine does with a bundle, stage by stage.

Each run is one `Pipeline.txt2img` call, the path users take, with timers around the pipeline's own pieces
(bound on the instance for the run and removed after it; `pipeline.py` is not changed):

    _job            the request: a fresh sampler per run (multistep samplers keep state)
    _conditioning   text encoder stage: tokenize + CLIP, the negative and positive prompt in one batch
    engines["unet"] U-Net stage, per model call (Heun makes 2N-1 calls, PLMS N+1); includes the engine's
                    input checks, as every call pays them
    sampler         sampler arithmetic per step: scale_model_input + step
    _denoise        the whole loop; what it spends outside the U-Net and the sampler is the loop overhead
                    (classifier-free guidance's concatenation and mix, the NaN check, casts)
    decode          VAE decode stage
    txt2img         end to end: request checks, noise, the stages above, PNG conversion (no watermark)

Medians and p90s are over the timed runs (per-step stages: over every step of every timed run), after the
warm-up runs. Memory is the process's peak RSS (`getrusage`: the peak since the process started, so the
loading of the bundle counts) and, on a GPU backend, the device's used memory sampled after each stage.

    from sdrt.bench import bench, format_table
    print(format_table(bench("bundles/sd15", steps=20, runs=5, warmup=1)))
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .errors import InvalidRequest
from .runtime import names

SCHEMA = 1  # bumped when the JSON layout changes
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"
# (key, label on the terminal, what one sample is)
STAGES = (
    ("text_encoder", "text encoder", "run"),
    ("unet_step", "U-Net, per model call", "model call"),
    ("sampler_step", "sampler arithmetic, per step", "step"),
    ("loop_overhead_step", "loop overhead, per step", "step"),
    ("vae_decode", "VAE decode", "run"),
    ("end_to_end", "end to end", "run"),
)
_WRAPPED = ("_job", "_conditioning", "_denoise", "decode")  # the pipeline methods bench times
_MISSING = object()


# -- the machine ----------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(gpu: str | None = None) -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cores_usable": usable, "gpu": gpu,
            "os": platform.platform()}


def versions() -> dict:
    import onnxruntime

    return {"sdrt": __version__, "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def peak_rss_mb() -> float:
    """The process's peak resident set since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def summarize(seconds: list[float]) -> dict:
    """Median and p90 (linear interpolation, numpy's default) in milliseconds."""
    ms = np.asarray(seconds, np.float64) * 1e3
    return {"median_ms": round(float(np.median(ms)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "min_ms": round(float(ms.min()), 4), "samples": len(ms)}


# -- timers around the pipeline's pieces ----------------------------------------------------------------
@dataclasses.dataclass
class RunTimes:
    """One run's timings, in seconds."""

    text: list[float] = dataclasses.field(default_factory=list)
    unet: list[float] = dataclasses.field(default_factory=list)  # per model call
    sampler: dict[int, float] = dataclasses.field(default_factory=dict)  # step index -> scale_model_input + step
    loop: list[float] = dataclasses.field(default_factory=list)
    decode: list[float] = dataclasses.field(default_factory=list)
    end_to_end: float = 0.0
    model_calls: int = 0  # len(sampler.timesteps)

    def check(self) -> None:
        """Every stage seen once (the loop once per model call): else txt2img no longer goes through the
        pieces bench wraps, and its numbers would be wrong rather than missing."""
        seen = {"_conditioning": len(self.text), "_denoise": len(self.loop), "decode": len(self.decode)}
        wrong = [f"{k} ran {n} times" for k, n in seen.items() if n != 1]
        if len(self.unet) != self.model_calls or len(self.sampler) != self.model_calls:
            wrong.append(f"{self.model_calls} model calls expected, the U-Net ran {len(self.unet)} times and the "
                         f"sampler {len(self.sampler)}")
        if wrong:
            raise RuntimeError("sdrt.bench could not time txt2img's stages (" + "; ".join(wrong) + "): "
                               "Pipeline.txt2img changed how it calls its pieces; update sdrt/bench.py")

    def loop_overhead(self) -> float:
        """Per step: the loop's time outside the U-Net and the sampler."""
        return (self.loop[0] - sum(self.unet) - sum(self.sampler.values())) / max(self.model_calls, 1)


class _TimedEngine:
    """An engine whose calls are timed; everything else is the engine's."""

    def __init__(self, engine, times: list[float], probe):
        self.engine, self._times, self._probe = engine, times, probe

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, **feeds):
        start = time.perf_counter()
        out = self.engine(**feeds)
        self._times.append(time.perf_counter() - start)
        self._probe()
        return out


class _TimedSampler:
    """A sampler whose scale_model_input + step are timed per step index; everything else is the sampler's."""

    def __init__(self, sampler, times: dict[int, float]):
        self.sampler, self._times = sampler, times

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def _timed(self, fn, i, *args):
        start = time.perf_counter()
        out = fn(*args)
        self._times[i] = self._times.get(i, 0.0) + time.perf_counter() - start
        return out

    def scale_model_input(self, x, i):
        return self._timed(self.sampler.scale_model_input, i, x, i)

    def step(self, model_output, i, x, rng):
        return self._timed(self.sampler.step, i, model_output, i, x, rng)


class _DeviceMemory:
    """Peak used device memory, sampled after each stage; a no-op on CPU backends (the hook for the GPU
    path: cudaMemGetInfo's total - free, so it counts every process on the device)."""

    def __init__(self, pipe):
        self.peak, self._rt = None, None
        if _backend(pipe) != "onnxruntime-cpu":
            try:
                from .runtime.engines import cuda

                self._rt, self._info = cuda.runtime(), cuda.mem_info_or_none
                self.peak = 0
            except Exception:  # noqa: BLE001 - no CUDA bindings: nothing to sample
                self._rt = None

    def __call__(self) -> None:
        if self._rt is not None:
            free, total = self._info(self._rt)
            if total:
                self.peak = max(self.peak, total - free)

    def gpu_name(self) -> str | None:
        if self._rt is None:
            return None
        try:
            from .runtime.engines import cuda

            return cuda.device_info(self._rt).name
        except Exception:  # noqa: BLE001 - the name is decoration
            return "unknown CUDA device"


@contextmanager
def instrumented(pipe, times: RunTimes, probe: Callable[[], None] = lambda: None):
    """Bind timed versions of the pipeline's pieces on `pipe` for one run; restore everything after."""
    saved = {name: pipe.__dict__.get(name, _MISSING) for name in _WRAPPED}
    job, conditioning, denoise, decode = (getattr(pipe, name) for name in _WRAPPED)

    def timed(fn, into: list[float]):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            into.append(time.perf_counter() - start)
            probe()
            return out
        return wrapper

    def timed_job(*args, **kwargs):
        j = job(*args, **kwargs)  # applies the request's LoRAs, so the U-Net is wrapped after it
        times.model_calls = len(j.solver.timesteps)
        if not isinstance(pipe.engines[names.UNET], _TimedEngine):
            pipe.engines[names.UNET] = _TimedEngine(pipe.engines[names.UNET], times.unet, probe)
        return dataclasses.replace(j, solver=_TimedSampler(j.solver, times.sampler))

    pipe._job = timed_job
    pipe._conditioning = timed(conditioning, times.text)
    pipe._denoise = timed(denoise, times.loop)
    pipe.decode = timed(decode, times.decode)
    try:
        yield times
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                pipe.__dict__.pop(name, None)
            else:
                setattr(pipe, name, value)
        unet = pipe.engines.get(names.UNET)
        if isinstance(unet, _TimedEngine):
            pipe.engines[names.UNET] = unet.engine


def timed_txt2img(pipe, prompt: str, latents: np.ndarray | None = None, probe=lambda: None,
                  **options) -> tuple[RunTimes, list]:
    """One txt2img call with every stage timed: (times, images). options: txt2img's."""
    times = RunTimes()
    with instrumented(pipe, times, probe):
        start = time.perf_counter()
        images = pipe.txt2img(prompt, latents=latents, **options)
        times.end_to_end = time.perf_counter() - start
    times.check()
    return times, images


def stage_stats(runs: list[RunTimes]) -> dict:
    """Per stage: median, p90, min (ms) and how many samples, over the given runs."""
    return {
        "text_encoder": summarize([r.text[0] for r in runs]),
        "unet_step": summarize([t for r in runs for t in r.unet]),
        "sampler_step": summarize([t for r in runs for t in r.sampler.values()]),
        "loop_overhead_step": summarize([r.loop_overhead() for r in runs]),
        "vae_decode": summarize([r.decode[0] for r in runs]),
        "end_to_end": summarize([r.end_to_end for r in runs]),
    }


def _threads(engine) -> int | None:
    """The U-Net's intra-op threads as ONNX Runtime was told them (None for other backends)."""
    try:
        return int(engine.session.get_session_options().intra_op_num_threads)
    except Exception:  # noqa: BLE001 - not an ONNX Runtime engine
        return getattr(engine, "threads", None)


def _backend(pipe) -> str:
    kinds = set()
    for engine in pipe.engines.values():
        engine = getattr(engine, "engine", engine)  # unwrap a timed engine
        session = getattr(engine, "session", None)
        if session is not None and hasattr(session, "get_providers"):
            provider = session.get_providers()[0]
            kinds.add("onnxruntime-" + provider.removesuffix("ExecutionProvider").lower())  # onnxruntime-cpu
        else:
            kinds.add(type(engine).__name__)
    return "+".join(sorted(kinds))


# -- the benchmark --------------------------------------------------------------------------------------
def bench(bundle=None, backend: str = "auto", sampler: str = "euler", steps: int = 20, height: int | None = None,
          width: int | None = None, batch: int = 1, runs: int = 5, warmup: int = 1, guidance: float = 7.5, *,
          prompt: str = DEFAULT_PROMPT, negative_prompt: str = "", threads: int | None = None,
          command: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Time `runs` txt2img calls after `warmup` untimed ones; the result is plain JSON-able data.

    bundle: a bundle folder, a loaded `sdrt.Pipeline`, or None for the embedded demo model. The seed is fixed,
    so every run does the same work. command: recorded as how to reproduce the result (default: this call)."""
    from .runtime.pipeline import Pipeline

    for value, what, lo in ((runs, "runs", 1), (warmup, "warmup", 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise InvalidRequest(f"{what} must be a whole number >= {lo}, got {value!r}")
    if command is None:
        command = (f"sdrt.bench.bench({str(bundle)!r}, backend={backend!r}, sampler={sampler!r}, steps={steps}, "
                   f"height={height}, width={width}, batch={batch}, runs={runs}, warmup={warmup}, "
                   f"guidance={guidance})")
    log = log or (lambda _: None)
    if isinstance(bundle, Pipeline):
        pipe, load_s = bundle, None
    else:
        if bundle is None:
            from .embedded import BUNDLE as bundle
        start = time.perf_counter()
        pipe = Pipeline.load(bundle, backend=backend, threads=threads)
        load_s = round(time.perf_counter() - start, 3)
    rss_after_load = peak_rss_mb()
    probe = _DeviceMemory(pipe)
    options = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=0, sampler=sampler,
                   height=height, width=width, batch=batch, watermark=False)
    timed: list[RunTimes] = []
    for n in range(warmup + runs):
        times, images = timed_txt2img(pipe, prompt, probe=probe, **options)
        kind = "warm-up" if n < warmup else "run"
        index = n + 1 if n < warmup else n - warmup + 1
        log(f"{kind} {index}/{warmup if n < warmup else runs}: {times.end_to_end * 1e3:.1f} ms")
        if n >= warmup:
            timed.append(times)
    stages = stage_stats(timed)
    w, h = images[0].size
    cfg = guidance > 1.0
    engine = getattr(pipe.engines[names.UNET], "engine", pipe.engines[names.UNET])
    return {
        "schema": SCHEMA,
        "command": command,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(probe.gpu_name()),
        "versions": versions(),
        "config": {
            "bundle": str(pipe.path), "model_hash": pipe.manifest.model_hash, "backend": _backend(pipe),
            "threads": _threads(engine), "native_ops": getattr(engine, "native_ops", None),
            "sampler": sampler, "steps": steps,
            "model_calls": timed[0].model_calls, "height": h, "width": w, "batch": batch, "guidance": guidance,
            "unet_batch": 2 * batch if cfg else batch, "runs": runs, "warmup": warmup, "prompt": prompt,
        },
        "load_s": load_s,
        "stages": stages,
        "images_per_s": round(batch / (stages["end_to_end"]["median_ms"] / 1e3), 4),
        "memory": {
            "peak_rss_mb": peak_rss_mb(), "peak_rss_after_load_mb": rss_after_load,
            "peak_device_mb": None if probe.peak is None else round(probe.peak / 2**20, 1),
            "note": "peak_rss_mb is the process's peak since it started (getrusage), so it includes loading",
        },
    }


def format_table(result: dict) -> str:
    """The terminal table for a `bench` result."""
    c, m, v, mem = result["config"], result["machine"], result["versions"], result["memory"]
    guided = f"batch {c['unet_batch']} with guidance {c['guidance']:g}" if c["unet_batch"] != c["batch"] else "no guidance"
    lines = [
        f"bundle   {c['bundle']}  ({c['backend']}, {c['threads']} threads"
        + {True: ", sdrt ops on)", False: ", sdrt ops off)"}.get(c.get("native_ops"), ")"),
        f"request  {c['width']}x{c['height']}, batch {c['batch']}, {c['sampler']}, {c['steps']} steps "
        f"({c['model_calls']} U-Net calls, {guided}); {c['runs']} runs after {c['warmup']} warm-up",
        "",
        f"{'stage':<32}{'median ms':>12}{'p90 ms':>12}{'samples':>9}",
    ]
    for key, label, _ in STAGES:
        s = result["stages"][key]
        lines.append(f"{label:<32}{s['median_ms']:>12.3f}{s['p90_ms']:>12.3f}{s['samples']:>9}")
    if mem["peak_device_mb"] is not None:
        device = f"{mem['peak_device_mb']:.0f} MB (device-wide)"
    else:
        device = "n/a (CPU)" if c["backend"] == "onnxruntime-cpu" else "unknown (needs cuda-python)"
    load = "" if result["load_s"] is None else f"   load {result['load_s']:.2f} s"
    lines += [
        "",
        f"images/s {result['images_per_s']:.3f}{load}   peak RSS {mem['peak_rss_mb']:.0f} MB (process)   "
        f"peak device memory {device}",
        f"machine  {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU"),
        "versions " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    return "\n".join(lines)


def check_output(path: Path) -> Path:
    """Fail before the benchmark, not after it, when the JSON cannot be written there."""
    from .runtime.fsutil import check_writable

    return check_writable(Path(path))


def write_json(result: dict, path: Path) -> None:
    from .runtime.fsutil import atomic_write_bytes

    atomic_write_bytes(check_output(path), (json.dumps(result, indent=2) + "\n").encode())


def command_line(argv: list[str] | None = None) -> str:
    """`sdrt ...` as typed (for the JSON's command)."""
    return shlex.join(["sdrt", *(sys.argv[1:] if argv is None else argv)])
