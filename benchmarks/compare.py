"""sdrt against diffusers' StableDiffusionPipeline, side by side: the same weights, size, steps, sampler and
initial latents, in one process, runs interleaved (sdrt, peer, sdrt, peer, ...) so the ratio holds on a noisy
machine. Per stage the ratio sdrt / peer (below 1: sdrt is faster), and the PSNR between the two final images,
so a fast wrong answer cannot win.

    python benchmarks/compare.py BUNDLE SRC [--steps 20] [--height H --width W] [--runs 5] [--json FILE]
    python benchmarks/compare.py --tiny [--steps 20] [--runs 5] [--json benchmarks/results/compare_tiny.json]

BUNDLE is an sdrt bundle and SRC the diffusers folder it was exported from; --tiny builds the random-weight
SD1-style model of tests/tiny_models.py and exports it. Peers: diffusers in PyTorch on the CPU (fp32, eager);
on a CUDA machine also fp16 eager and fp16 with the U-Net under torch.compile. sdrt runs on its default
backend (ONNX Runtime on the CPU here; --backend to choose). Both sides get the same number of threads unless
--peer-threads gives diffusers its own (PyTorch may be faster on fewer threads than cores: compare against its
best).

Stages: text encoder (tokenize + encode the prompt and the negative prompt), U-Net per model call, VAE decode,
end to end (PIL images out, no watermark, no safety checker), and what end to end spends outside the U-Net
(request, text, sampler, loop, decode, conversion: where small models lose their time).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "a red circle on a blue background"
STAGES = ("text_encoder", "unet_step", "vae_decode", "end_to_end", "outside_unet")
LABELS = {"text_encoder": "text encoder", "unet_step": "U-Net, per model call", "vae_decode": "VAE decode",
          "end_to_end": "end to end", "outside_unet": "end to end outside the U-Net"}


# -- diffusers, timed -----------------------------------------------------------------------------------
class Peer:
    """A diffusers StableDiffusionPipeline with timers on encode_prompt, the U-Net's forward and vae.decode."""

    def __init__(self, name: str, src: Path, sampler: str, device: str = "cpu", dtype: str = "float32",
                 compile_unet: bool = False):
        import diffusers
        import torch
        from diffusers import StableDiffusionPipeline

        from sdrt.runtime.samplers import SAMPLERS

        self.name, self.device, self.torch = name, device, torch
        self.dtype = getattr(torch, dtype)
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype; older ones know only the first
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(src, torch_dtype=self.dtype, safety_checker=None,
                                                           requires_safety_checker=False)
        cls = SAMPLERS[sampler]  # the diffusers class sdrt's sampler was checked against, from the model's config
        pipe.scheduler = getattr(diffusers, cls.diffusers_class).from_config(
            {**pipe.scheduler.config, **cls.diffusers_config})
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if compile_unet:
            pipe.unet = torch.compile(pipe.unet)
        self.pipe, self.compiled = pipe, compile_unet
        self._current: dict | None = None
        encode, decode = pipe.encode_prompt, pipe.vae.decode
        pipe.encode_prompt = self._timed(encode, "text")
        pipe.vae.decode = self._timed(decode, "decode")
        pipe.unet.register_forward_pre_hook(self._unet_start)
        pipe.unet.register_forward_hook(self._unet_end)
        self.config = {"library": "diffusers", "device": device, "dtype": dtype, "torch.compile": compile_unet,
                       "scheduler": type(pipe.scheduler).__name__, "threads": torch.get_num_threads()}

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _timed(self, fn, key: str):
        def wrapper(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            if self._current is not None:
                self._current[key].append(time.perf_counter() - start)
            return out
        return wrapper

    def _unet_start(self, module, args):
        self._sync()
        self._t0 = time.perf_counter()

    def _unet_end(self, module, args, output):
        self._sync()
        if self._current is not None:
            self._current["unet"].append(time.perf_counter() - self._t0)

    def run(self, prompt: str, latents: np.ndarray, steps: int, guidance: float, timed: bool = True):
        """(times, images): images as uint8 (B, H, W, 3)."""
        torch = self.torch
        self._current = {"text": [], "unet": [], "decode": []} if timed else None
        lat = torch.from_numpy(latents).to(self.device, self.dtype)
        self._sync()
        start = time.perf_counter()
        images = self.pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=lat,
                           num_images_per_prompt=len(latents), output_type="pil").images
        total = time.perf_counter() - start
        times, self._current = self._current, None
        if times is not None:
            times["end_to_end"] = total
        return times, np.stack([np.asarray(im) for im in images])


def peers(src: Path, sampler: str, compile_args: tuple) -> list[Peer]:
    import torch

    out = [Peer("diffusers cpu fp32 eager", src, sampler)]
    if torch.cuda.is_available():  # the GPU peers: only where there is a GPU
        out.append(Peer("diffusers cuda fp16 eager", src, sampler, "cuda", "float16"))
        compiled = Peer("diffusers cuda fp16 torch.compile", src, sampler, "cuda", "float16", compile_unet=True)
        compiled.run(*compile_args, timed=False)  # compile before anything is timed
        out.append(compiled)
    return out


# -- sdrt, timed ------------------------------------------------------------------------------------------
def run_sdrt(pipe, prompt: str, latents: np.ndarray, steps: int, guidance: float, sampler: str):
    from sdrt.bench import timed_txt2img

    t, images = timed_txt2img(pipe, prompt, latents=latents, steps=steps, guidance=guidance, sampler=sampler,
                              batch=len(latents), watermark=False)
    times = {"text": t.text, "unet": t.unet, "decode": t.decode, "end_to_end": t.end_to_end}
    return times, np.stack([np.asarray(im) for im in images])


# -- statistics -----------------------------------------------------------------------------------------
def stage_samples(runs: list[dict]) -> dict[str, list[float]]:
    return {
        "text_encoder": [r["text"][0] for r in runs],
        "unet_step": [t for r in runs for t in r["unet"]],
        "vae_decode": [r["decode"][0] for r in runs],
        "end_to_end": [r["end_to_end"] for r in runs],
        "outside_unet": [r["end_to_end"] - sum(r["unet"]) for r in runs],
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """dB between two uint8 images; None when they are identical (infinite)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)


def tiny_model(work: Path) -> tuple[Path, Path]:
    from tiny_models import build_model

    from sdrt.export import export_bundle

    src = build_model(work / "src", "sd1")
    export_bundle(src, work / "bundle", log=lambda *_: None)
    return work / "bundle", src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="sdrt bundle")
    ap.add_argument("src", type=Path, nargs="?", help="the diffusers folder the bundle was exported from")
    ap.add_argument("--tiny", action="store_true", help="build and export tests/tiny_models.py's SD1-style model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sampler", default="euler", help="a deterministic sdrt sampler (default euler)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, help="for both sides (default: every core)")
    ap.add_argument("--peer-threads", type=int, help="diffusers' threads (default: sdrt's)")
    ap.add_argument("--settle", type=float, default=0.2,
                    help="seconds of idle before each side's run, so neither runs beside the other's spinning "
                         "worker threads (ONNX Runtime's and OpenMP's spin a while after their work); default 0.2")
    ap.add_argument("--backend", default="auto", help="sdrt's backend")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    if args.tiny == (args.bundle is not None) or (args.bundle is None) != (args.src is None):
        ap.error("give BUNDLE and SRC, or --tiny")
    if min(args.runs, args.threads or 1, args.peer_threads or 1) < 1 or min(args.warmup, args.settle) < 0:
        ap.error("--runs, --threads and --peer-threads must be >= 1, --warmup and --settle >= 0")

    import diffusers
    import torch

    import sdrt
    from sdrt.bench import check_output, machine_info, versions
    from sdrt.runtime.samplers import resolve

    if resolve(args.sampler).stochastic:
        ap.error(f"{args.sampler} draws noise per step, which torch draws differently: the images could not be "
                 "compared; pick a deterministic sampler")
    if args.json:
        check_output(args.json)  # before the work, not after it
    diffusers.utils.logging.set_verbosity_error()
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(args.peer_threads or threads)
    work = None
    if args.tiny:
        work = tempfile.TemporaryDirectory(prefix="sdrt-compare-")
        bundle, src = tiny_model(Path(work.name))
    else:
        bundle, src = args.bundle, args.src
    pipe = sdrt.Pipeline.load(bundle, backend=args.backend, threads=threads)
    m = pipe.manifest
    height, width = args.height or m.default_height, args.width or m.default_width
    latents = np.random.default_rng(0).standard_normal(
        (args.batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)).astype(np.float32)
    sampler = resolve(args.sampler).name
    request = (args.prompt, latents, args.steps, args.guidance)
    others = peers(src, sampler, request)

    ours: list[dict] = []
    theirs: dict[str, list[dict]] = {p.name: [] for p in others}
    images: dict[str, np.ndarray] = {}
    for n in range(args.warmup + args.runs):  # A B A B
        time.sleep(args.settle)
        t, images["sdrt"] = run_sdrt(pipe, *request, sampler)
        line = [f"sdrt {t['end_to_end'] * 1e3:.1f} ms"]
        if n >= args.warmup:
            ours.append(t)
        for p in others:
            time.sleep(args.settle)
            t, images[p.name] = p.run(*request)
            line.append(f"{p.name} {t['end_to_end'] * 1e3:.1f} ms")
            if n >= args.warmup:
                theirs[p.name].append(t)
        print(("warm-up " if n < args.warmup else f"run {n - args.warmup + 1}/{args.runs} ") + ", ".join(line),
              file=sys.stderr)

    from sdrt.bench import summarize

    sdrt_stats = {k: summarize(v) for k, v in stage_samples(ours).items()}
    result = {
        "command": shlex.join(["python", "benchmarks/compare.py", *sys.argv[1:]]),
        "machine": machine_info(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        "versions": {**versions(), "torch": torch.__version__, "diffusers": diffusers.__version__},
        "config": {"model": "tiny sd1 (tests/tiny_models.py)" if args.tiny else str(src), "bundle_hash": m.model_hash,
                   "height": height, "width": width, "batch": args.batch, "steps": args.steps, "sampler": sampler,
                   "guidance": args.guidance, "model_calls": len(ours[0]["unet"]), "runs": args.runs,
                   "warmup": args.warmup, "settle_s": args.settle, "threads": threads, "prompt": args.prompt,
                   "latents": "numpy PCG64 seed 0"},
        "sdrt": {"backend": args.backend, "stages": sdrt_stats},
        "peers": {},
    }
    for p in others:
        stats = {k: summarize(v) for k, v in stage_samples(theirs[p.name]).items()}
        diff = np.abs(images["sdrt"].astype(np.int16) - images[p.name].astype(np.int16))
        result["peers"][p.name] = {
            **p.config, "stages": stats,
            "ratio": {k: round(sdrt_stats[k]["median_ms"] / stats[k]["median_ms"], 4) for k in STAGES},
            "psnr_db": psnr(images["sdrt"], images[p.name]), "max_pixel_diff": int(diff.max()),
        }
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if work is not None:
        work.cleanup()


def table(result: dict) -> str:
    c = result["config"]
    lines = [f"{c['model']}: {c['width']}x{c['height']}, batch {c['batch']}, {c['sampler']} {c['steps']} steps, "
             f"guidance {c['guidance']:g}, {c['threads']} threads; median of {c['runs']} interleaved runs"]
    for name, peer in result["peers"].items():
        if peer.get("threads", c["threads"]) != c["threads"]:
            name = f"{name} ({peer['threads']} thread{'s' if peer['threads'] != 1 else ''})"
        lines += ["", f"{'stage':<32}{'sdrt ms':>11}{name + ' ms':>{max(len(name) + 5, 14)}}{'sdrt/peer':>11}"]
        for k in STAGES:
            a, b = result["sdrt"]["stages"][k]["median_ms"], peer["stages"][k]["median_ms"]
            lines.append(f"{LABELS[k]:<32}{a:>11.3f}{b:>{max(len(name) + 5, 14)}.3f}{peer['ratio'][k]:>11.3f}")
        p = "identical" if peer["psnr_db"] is None else f"{peer['psnr_db']:.2f} dB"
        lines.append(f"PSNR sdrt vs {name}: {p} (max pixel difference {peer['max_pixel_diff']}/255)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
