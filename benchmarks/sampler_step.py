"""The sampler's own arithmetic per step, at Stable Diffusion 1.5's latent size: sdrt's numpy samplers against
diffusers' torch schedulers, interleaved in one process (the peer is measured in the same run, so the ratio
holds on a noisy machine). The U-Net is replaced by a fixed array: only scale_model_input + step are timed.

    python benchmarks/sampler_step.py [--steps 20] [--repeats 15] [--json benchmarks/results/sampler_step.json]

Budget (issue 3): under 1 ms per step for every sampler.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = (2, 4, 64, 64)  # batch 2 (guidance), 4 latent channels, 512 / 8
SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def time_ours(name: str, steps: int, x: np.ndarray, out: np.ndarray) -> float:
    from sdrt.runtime.samplers import make_sampler

    s, rng = make_sampler(name, SD15, steps), np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(len(s.timesteps)):
        s.scale_model_input(x, i)
        s.step(out, i, x, rng)
    return (time.perf_counter() - start) / len(s.timesteps)


def time_diffusers(name: str, steps: int, x: np.ndarray, out: np.ndarray) -> float:
    import diffusers
    import torch

    from sdrt.runtime.samplers import SAMPLERS

    cls = SAMPLERS[name]
    sched = getattr(diffusers, cls.diffusers_class).from_config({**SD15, **cls.diffusers_config})
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    xt, ot = torch.from_numpy(x), torch.from_numpy(out)
    start = time.perf_counter()
    for t in sched.timesteps:
        sched.scale_model_input(xt, t)
        sched.step(ot, t, xt)
    return (time.perf_counter() - start) / len(sched.timesteps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from sdrt.runtime.samplers import SAMPLERS

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # SD's config has keys some classes don't know; they say so each time
    torch.set_num_threads(1)  # numpy's elementwise arithmetic is single-threaded too
    rng = np.random.default_rng(0)
    x, out = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    rows = {}
    print(f"{'sampler':<22}{'sdrt ms/step':>14}{'diffusers ms/step':>19}{'ratio':>8}")
    for name in SAMPLERS:
        ours, theirs = [], []
        for _ in range(args.repeats):  # A B A B
            ours.append(time_ours(name, args.steps, x, out))
            theirs.append(time_diffusers(name, args.steps, x, out))
        a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
        rows[name] = {"sdrt_ms_per_step": round(a, 4), "diffusers_ms_per_step": round(b, 4), "ratio": round(a / b, 3),
                      "sdrt_p90_ms": round(sorted(ours)[int(0.9 * (len(ours) - 1))] * 1e3, 4)}
        print(f"{name:<22}{a:>14.3f}{b:>19.3f}{a / b:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "shape": SHAPE, "steps": args.steps, "repeats": args.repeats,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "versions": {"numpy": np.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
            "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
