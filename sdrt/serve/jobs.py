"""A job per request: its own id, state, progress and cancel. Jobs wait in a bounded FIFO queue (queue.py) and
workers run them; a job of `n_iter` iterations is `n_iter` parts, each a batch of `batch_size` images."""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InvalidRequest, JobCancelled, JobTimedOut, ServiceError

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL = (DONE, FAILED, CANCELLED)


@dataclass(frozen=True)
class Work:
    """What a job asks of one served model. options: the pipeline options every mode takes (sdrt's names);
    mode_args: the mode's own (image, mask, strength, ...). batch_key: None, or what another job's parts must
    equal to share its U-Net calls (runtime.batch checks the rest)."""

    mode: str  # txt2img | img2img | inpaint
    model: str
    prompt: str
    options: dict
    seed: int
    batch_size: int
    n_iter: int
    mode_args: dict = field(default_factory=dict)
    batch_key: tuple | None = None


class Job:
    def __init__(self, work: Work, job_id: str | None = None, timeout_s: float | None = None):
        self.id = job_id or uuid.uuid4().hex
        self.work = work
        self.state, self.error = QUEUED, None
        self.created, self.started, self.finished = time.time(), None, None
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else self.created + timeout_s
        self.next_part, self.parts_done = 0, 0  # parts taken by workers / finished
        self.step, self.steps = 0, 0  # of the part running now
        self.interrupted, self.skipped = False, set()  # A1111's /interrupt (the job), /skip (the part running)
        self._images: dict[int, list] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._waiters: list[Callable[[], None]] = []

    # -- what workers call -------------------------------------------------------------------------------------
    def seeds_of(self, part: int) -> list[int]:
        b = self.work.batch_size
        return [self.work.seed + part * b + i for i in range(b)]

    def start_part(self, part: int) -> None:
        with self._lock:
            if self.state == QUEUED:
                self.state, self.started = RUNNING, time.time()
            self.step, self.steps = 0, 0

    def progress(self, done: int, total: int) -> None:
        self.step, self.steps = done, total

    def should_stop(self, part: int) -> bool:
        self.check_deadline()
        return self.state in FINAL or self.interrupted or part in self.skipped

    def check_deadline(self) -> None:
        """Past its timeout (waiting included), the job ends with a JobTimedOut (504)."""
        if self.deadline is not None and time.time() > self.deadline and self.state not in FINAL:
            self.finish(error=JobTimedOut(f"job {self.id} ran past its timeout ({self.timeout_s:.0f} s; sdrt "
                                          "serve --job-timeout S)"))

    def part_done(self, part: int, images: list) -> None:
        with self._lock:
            if self.state in FINAL:
                return
            self._images[part] = images
            self.parts_done += 1
            finished = self.parts_done >= self.work.n_iter or self.interrupted
        if finished:
            self.finish()

    def finish(self, error: Exception | None = None) -> None:
        """The job's end: done (its images so far), failed or cancelled (error). Only the first call counts."""
        with self._lock:
            if self.state in FINAL:
                return
            self.state = DONE if error is None else CANCELLED if isinstance(error, JobCancelled) else FAILED
            self.error, self.finished = error, time.time()
            waiters, self._waiters = self._waiters, []
        self._done.set()
        for wake in waiters:
            wake()

    # -- what the server calls ---------------------------------------------------------------------------------
    @property
    def is_final(self) -> bool:
        return self.state in FINAL

    def on_final(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if self.state not in FINAL:
                self._waiters.append(wake)
                return
        wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def take_images(self) -> list:
        """The images in seed order, once: the job keeps only its status afterwards (memory stays flat)."""
        with self._lock:
            images = [im for part in sorted(self._images) for im in self._images[part]]
            self._images = {}
        return images

    def status(self, queue_position: int | None = None) -> dict[str, Any]:
        total = self.work.n_iter * max(self.steps, 1)
        done = self.parts_done * max(self.steps, 1) + (self.step if self.state == RUNNING else 0)
        fraction = 1.0 if self.state == DONE else min(done / total, 1.0) if total else 0.0
        eta = None
        if self.state == RUNNING and self.started and fraction > 0:
            elapsed = time.time() - self.started
            eta = max(elapsed / fraction - elapsed, 0.0)
        return {"id": self.id, "state": self.state, "model": self.work.model, "mode": self.work.mode,
                "step": self.step, "steps": self.steps, "part": min(self.parts_done + 1, self.work.n_iter),
                "parts": self.work.n_iter, "parts_done": self.parts_done, "skipped": bool(self.skipped),
                "progress": round(fraction, 4), "eta": eta, "queue_position": queue_position, "interrupted": self.interrupted,
                "error": None if self.error is None else _describe(self.error),
                "created": self.created, "started": self.started, "finished": self.finished}


def status_of(error: Exception) -> int:
    """The HTTP status a failed job answers with: the request's fault 4xx, the server's 500."""
    if isinstance(error, ServiceError):
        return error.status
    return 400 if isinstance(error, InvalidRequest) else 500


def _describe(error: Exception) -> dict:
    return {"type": type(error).__name__, "message": str(error), "status": status_of(error)}
