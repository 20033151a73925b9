"""The service: a bounded FIFO of jobs and the workers that run them. A worker takes the oldest waiting part and,
when batching is on, every waiting part that can share its U-Net calls (same batch key), up to `max_batch`
images, waiting up to `batch_window_s` for more to arrive. A batch that fails is run again one job at a time, so
a failing job (NaN, an engine error) fails alone. The window is waited only while the server is busy (two jobs
alive at once in the last BUSY_S seconds: a lone client's request starts at once), and once a second job has
joined, only while more keep arriving (QUIET_S apart)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..errors import JobCancelled, NotFound, QueueFull
from ..runtime.batch import Member, txt2img_batch
from .controlnet_units import controls
from .jobs import FINAL, QUEUED, RUNNING, Job, Work
from .models import ModelSet
from .shared import Local


BUSY_S = 2.0  # the window is waited only when two jobs were alive at once within this many seconds
QUIET_S = 0.01  # and only while jobs keep arriving: once one joined, this long without another ends it


@dataclass(frozen=True)
class Settings:
    queue: int = 64  # jobs waiting (not yet started); one more is a 503
    batch_window_s: float = 0.05
    max_batch: int = 8  # images per batched run; 1 turns batching off
    # and at most this many pixels (images x width x height) per batched run: its memory grows with them. Measured
    # (benchmarks/results/serve_sd15.json): SD 1.5 at 512x512 peaked at 11.1 GB alone, 23.2 GB in batches of four
    # (eight ran out of 24 GB), for no gain in throughput on the CPU; so by default one 512x512 image, and up to
    # max_batch smaller ones (64 at 64x64), where batching pays.
    max_batch_pixels: int = 512 * 512
    workers: int = 1  # each holds its own copy of every served pipeline
    job_timeout_s: float | None = 600.0
    keep_finished: int = 1000  # finished jobs whose status GET /sdrt/v1/jobs/{id} still answers


class Service:
    def __init__(self, models: ModelSet, settings: Settings = Settings()):
        self.models, self.settings = models, settings
        self.shared = Local(models.default.title)  # A1111's global model and options (a hub under Ray Serve)
        self._cond = threading.Condition()
        self._waiting: list[Job] = []  # jobs with parts no worker has taken, oldest first
        self._jobs: dict[str, Job] = {}
        self._workers: list[threading.Thread] = []
        self._pipes: list[dict] = []  # each worker's pipelines by model name
        self.stats = {"runs": 0, "batched_runs": 0, "batched_jobs": 0, "fallbacks": 0}  # what batching did
        self.closing = False
        self._load: list[tuple[float, int]] = []  # (when, jobs alive) at each submit: is anyone else here?

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> "Service":
        for n in range(self.settings.workers):
            pipes, nets = self.models.open_all(), self.models.open_nets()
            self._pipes.append(pipes)
            worker = threading.Thread(target=self._work, args=(pipes, nets), name=f"sdrt-worker-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def drain(self) -> None:
        """Stop taking jobs and cancel the waiting ones; running ones go on (SIGTERM's first step)."""
        with self._cond:
            self.closing = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
        for job in waiting:
            job.finish(JobCancelled(f"job {job.id} was cancelled before it started: the server is shutting down"))

    def close(self, drain_s: float = 30.0) -> None:
        """drain(), let running jobs finish for up to drain_s, cancel the rest, stop the workers."""
        self.drain()
        deadline = time.time() + drain_s
        for job in self.running():
            if not job.wait(max(deadline - time.time(), 0)):
                job.finish(JobCancelled(f"job {job.id} was cancelled: the server shut down before it finished"))
        for worker in self._workers:
            worker.join(timeout=max(deadline - time.time(), 0) + 5)
        self.shared.close()

    # -- jobs --------------------------------------------------------------------------------------------------
    def submit(self, work: Work, job_id: str | None = None) -> Job:
        with self._cond:
            if self.closing:
                raise QueueFull("the server is shutting down and takes no new jobs", retry_after=30)
            queued = sum(1 for j in self._waiting if j.state == QUEUED)
            if queued >= self.settings.queue:
                raise QueueFull(f"the queue is full ({queued} jobs waiting; sdrt serve --queue N); retry later",
                                retry_after=self._retry_after())
            if job_id is not None and job_id in self._jobs and not self._jobs[job_id].is_final:
                raise QueueFull(f"a job with id {job_id!r} is still running; use another force_task_id", 1)
            job = Job(work, job_id, self.settings.job_timeout_s)
            self._remember(job)
            self._waiting.append(job)
            alive = len(self._waiting) + len(self.running())
            self._load = [(t, n) for t, n in self._load if t > time.time() - BUSY_S] + [(time.time(), alive)]
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str = "cancelled by the client") -> None:
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
        job.finish(JobCancelled(f"job {job.id} was {reason}"))

    def find(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def embedding_names(self) -> list[str]:
        pipe = self._current_pipe()
        return sorted(pipe.text.embeddings) if pipe is not None else []

    def hypernetwork_names(self) -> list[str]:
        pipe = self._current_pipe()
        return sorted(pipe.manifest.hypernetworks) if pipe is not None else []

    def _current_pipe(self):
        """The first worker's pipeline of the server's model (None before start)."""
        return self._pipes[0][self.chosen()[0].name] if self._pipes else None

    def running(self) -> list[Job]:
        return [j for j in list(self._jobs.values()) if j.state == RUNNING]

    # -- what A1111 keeps global (shared.py: across replicas under Ray Serve) ---------------------------------------
    def chosen(self):
        """(the served model, the options clients set): one read of the shared state (a Ray call under Ray)."""
        title, options = self.shared.settings()
        return self.models.find(title), options

    def set_options(self, options: dict) -> None:
        if "sd_model_checkpoint" in options:
            current = self.models.find(options["sd_model_checkpoint"])  # a served name, or a 400
        else:
            current = self.chosen()[0]
        rest = {k: v for k, v in options.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")}
        self.shared.set_settings(current.title, rest)

    def interrupt(self, kind: str = "interrupt") -> None:
        """A1111's /interrupt (the running jobs stop at their next step and return what they have) or /skip (their
        running iteration ends there), here and on every other replica."""
        self.apply(kind, None)
        self.shared.broadcast(kind)

    def cancel_id(self, job_id: str) -> dict:
        job = self.find(job_id)
        if job is not None:
            self.cancel(job)
            return job.status(None)
        status = self.status(job_id)  # another replica's job: it cancels it at its next sync
        self.shared.broadcast("cancel", job_id)
        return {**status, "cancel_requested": True}

    def apply(self, kind: str, arg: str | None) -> None:
        for job in self.running() if kind != "cancel" else [self.find(arg)]:
            if job is None:
                continue
            if kind == "interrupt":
                job.interrupted = True
            elif kind == "skip":
                job.skipped.add(job.parts_done)
            elif kind == "cancel":
                self.cancel(job)

    def local_statuses(self, finished_within_s: float) -> list[dict]:
        since = time.time() - finished_within_s
        return [j.status(self.position(j)) for j in list(self._jobs.values())
                if not j.is_final or (j.finished or 0) > since]

    def status(self, job_id: str) -> dict:
        """A job's status, on this replica or another (as it last published it)."""
        job = self.find(job_id)
        if job is not None:
            return job.status(self.position(job))
        for status in self.shared.others():
            if status["id"] == job_id:
                return status
        raise NotFound(f"no job with id {job_id[:100]!r} (finished jobs are kept for the last "
                       f"{self.settings.keep_finished})")

    def running_statuses(self) -> list[dict]:
        """Every running job's status, here and on other replicas, oldest first."""
        mine = [j.status(None) for j in self.running()]
        return sorted(mine + [s for s in self.shared.others() if s["state"] == RUNNING],
                      key=lambda s: s["started"] or 0)

    def position(self, job: Job) -> int | None:
        with self._cond:
            queued = [j for j in self._waiting if j.state == QUEUED]
        return queued.index(job) if job in queued else None

    def counts(self) -> dict:
        states = [j.state for j in list(self._jobs.values())]
        return {"queued": states.count(QUEUED), "running": states.count(RUNNING)}

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        if len(self._jobs) > self.settings.keep_finished:
            for old in [k for k, j in self._jobs.items() if j.is_final][: len(self._jobs) - self.settings.keep_finished]:
                del self._jobs[old]

    def _retry_after(self) -> int:
        done = [j for j in self._jobs.values() if j.state in FINAL and j.started and j.finished]
        per_job = sum(j.finished - j.started for j in done[-20:]) / max(len(done[-20:]), 1)
        return max(1, round(per_job * max(len(self._waiting), 1) / max(self.settings.workers, 1)))

    # -- workers -----------------------------------------------------------------------------------------------
    def _take(self) -> list[tuple[Job, int]] | None:
        """The oldest waiting part and the parts that can share its run; None when the service closes."""
        with self._cond:
            while True:
                self._waiting = [j for j in self._waiting if not j.is_final]
                if self._waiting or self.closing:
                    break
                self._cond.wait()
            if not self._waiting:
                return None
            first = self._waiting[0]
            batch, images = [self._claim(first)], first.work.batch_size
            key, s = first.work.batch_key, self.settings
            limit = min(s.max_batch, s.max_batch_pixels // _pixels(first.work))
            if key is None or limit <= 1:
                return batch
            busy = max((n for t, n in self._load if t > time.time() - BUSY_S), default=0) > 1
            deadline = time.time() + (s.batch_window_s if busy else 0.0)  # a lone client never waits
            while images < limit:
                before = len(batch)
                for job in list(self._waiting):
                    if job.work.batch_key == key and not job.is_final and images + job.work.batch_size <= limit:
                        batch.append(self._claim(job))
                        images += job.work.batch_size
                left = deadline - time.time()
                quiet = len(batch) == before and len(batch) > 1  # arrivals stopped: don't wait the window out
                if left <= 0 or images >= limit or self.closing or quiet:
                    break
                self._cond.wait(min(left, QUIET_S))
            return batch

    def _claim(self, job: Job) -> tuple[Job, int]:
        part = job.next_part
        job.next_part += 1
        if job.next_part >= job.work.n_iter:
            self._waiting.remove(job)
        return job, part

    def _work(self, pipes: dict, nets: dict) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            for job, part in batch:
                job.start_part(part)
            self.stats["runs"] += 1
            # TensorRT engines are built per batch size (sdrt build --batch): batched runs are ONNX Runtime's only
            if len(batch) > 1 and pipes[batch[0][0].work.model].backend != "tensorrt":
                try:
                    self._run_together(pipes[batch[0][0].work.model], batch)
                    self.stats["batched_runs"] += 1
                    self.stats["batched_jobs"] += len(batch)
                    continue
                except Exception:  # NotBatchable, or one job's failure: each runs alone and fails alone
                    self.stats["fallbacks"] += 1
            for job, part in batch:
                self._run_alone(pipes[job.work.model], nets, job, part)

    def _run_together(self, pipe, batch) -> None:
        members = [Member(job.work.prompt, _part_options(job, part), progress=job.progress,
                          stop=lambda job=job, part=part: job.should_stop(part)) for job, part in batch]
        results = txt2img_batch(pipe, members)
        for (job, part), images in zip(batch, results):
            job.part_done(part, images)

    def _run_alone(self, pipe, nets: dict, job: Job, part: int) -> None:
        if job.is_final:
            return
        w = job.work
        options = {**_part_options(job, part), "progress": job.progress, "stop": lambda: job.should_stop(part)}
        try:
            if w.mode_args.get("units"):
                options["controls"] = controls(w.mode_args["units"], nets)
            if w.mode == "txt2img":
                images = pipe.txt2img(w.prompt, **options)
            elif w.mode == "img2img":
                images = pipe.img2img(w.mode_args["image"], w.prompt, **w.mode_args["args"], **options)
            else:
                images = pipe.inpaint(w.mode_args["image"], w.mode_args["mask"], w.prompt, **w.mode_args["args"],
                                      **options)
        except Exception as e:  # this job fails; the worker and the server go on
            job.finish(error=e)
            return
        job.part_done(part, images)


def _part_options(job: Job, part: int) -> dict:
    """The pipeline options of one part (iteration) of a job: its seeds start at seed + part x batch_size."""
    return {**job.work.options, "seed": job.seeds_of(part)[0], "batch": job.work.batch_size}


def _pixels(work: Work) -> int:
    return max(work.options.get("width") or 512, 1) * max(work.options.get("height") or 512, 1)


__all__ = ["Service", "Settings"]
