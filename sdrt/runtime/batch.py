"""Several txt2img requests through one denoise loop: their rows share every U-Net call.

What may differ between the requests: prompts, negative prompts, seeds, batch sizes and guidance scales (each row
keeps its own scale). What must not: everything that changes the schedule or the weights (size, steps, sampler,
eta, guidance on/off, LoRA set, hypernetwork, clip skip, emphasis, the prompt's 77-token chunk count). A request
made in a batch equals the same request made alone up to the engine's batched arithmetic (row i draws its noise
from the generator of its own seed either way: request.BatchNoise).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..errors import InvalidRequest
from . import request


class NotBatchable(InvalidRequest):
    """The requests differ in something their rows can't share; each runs alone instead."""


@dataclass
class Member:
    """One request of a batch: txt2img's prompt and options (not `latents`, `controls` or `stop`), and its
    progress(done, total) and stop() (True: this request no longer needs its rows)."""

    prompt: str
    options: dict
    progress: Callable[[int, int], None] | None = None
    stop: Callable[[], bool] | None = None


def shared_key(job) -> tuple:
    """What two checked jobs must have in common to share U-Net calls."""
    solver = job.solver
    return (job.height, job.width, job.steps, type(solver).__name__, getattr(solver, "eta", None),
            job.guidance > 1.0, job.text, job.hypernetwork, job.guide is None)


def txt2img_batch(pipe, members: list[Member]) -> list[list]:
    """Each member's images, as `pipe.txt2img(m.prompt, **m.options)` makes them. The loop stops early only when
    every member's stop() says so. Raises NotBatchable when the members can't share a loop."""
    if not members:
        return []
    for m in members:
        if {"latents", "controls", "stop", "progress"} & set(m.options):
            raise InvalidRequest("batched txt2img takes no latents, controls, stop or progress options")
    if len({_lora_set(pipe, m) for m in members}) > 1:
        raise NotBatchable("these requests ask for different LoRAs: run them one by one")
    jobs = [pipe._job(m.prompt, **m.options) for m in members]  # each sets the same LoRAs
    pipe._require_unet(pipe.manifest.latent_channels, "text-to-image")
    if len({shared_key(j) for j in jobs}) > 1:
        raise NotBatchable("these requests differ in size, steps, sampler, guidance on/off, hypernetwork or "
                           "text options: run them one by one")
    conds = [pipe._conditioning(j) for j in jobs]
    if len({tuple((k, v.shape[1:]) for k, v in sorted(c.items())) for c in conds}) > 1:
        raise NotBatchable("these prompts encode to different numbers of 77-token chunks: run them one by one")
    job = _joined(jobs, members)
    x = job.noise.standard_normal(job.latent_shape) * np.float32(job.solver.init_noise_sigma)  # (ΣB, 4, h, w)
    x = pipe._denoise(x, _stacked(conds, jobs), job, progress=_fan_out(members))
    decoded, out, row = pipe.decode(x), [], 0
    for j in jobs:
        out.append(pipe._images(decoded[row:row + j.batch], j))
        row += j.batch
    return out


def _lora_set(pipe, m: Member) -> tuple:
    return tuple((str(path), float(w)) for path, w in pipe._request_loras(m.prompt, m.options.get("loras")))


def _joined(jobs, members):
    """One job over every member's rows: the seeds in order, each row's guidance scale."""
    seeds = [s for j in jobs for s in j.noise.seeds]
    scales = np.concatenate([np.full(j.batch, j.guidance, np.float32) for j in jobs]).reshape(-1, 1, 1, 1)
    shape = (len(seeds), *jobs[0].latent_shape[1:])
    stops = [m.stop for m in members]
    return replace(jobs[0], batch=len(seeds), latent_shape=shape, noise=request.BatchNoise(seeds),
                   row_guidance=scales, stop=lambda: all(s is not None and s() for s in stops))


def _stacked(conds: list[dict], jobs) -> dict:
    """Each input's rows [negatives of every member; positives of every member] with guidance, as one request's
    are [negative (B); positive (B)]; without guidance the positives in order."""
    out = {}
    for name in conds[0]:
        if jobs[0].guidance > 1.0:
            halves = [np.split(c[name], 2) for c in conds]
            out[name] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[name] = np.concatenate([c[name] for c in conds])
    return out


def _fan_out(members):
    def progress(done: int, total: int) -> None:
        for m in members:
            if m.progress is not None:
                m.progress(done, total)
    return progress
