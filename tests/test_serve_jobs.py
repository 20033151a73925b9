"""sdrt serve's jobs: the bounded queue, per-job status, events and cancel, interrupt and skip, disconnects,
timeouts, batching (equal to running alone) and failures that stay with their job."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import requests

from sdrt.serve import Settings
from serve_helpers import decoded, pixels, running_server, wait_until

SLOW = {"prompt": "a large red square on a blue background", "steps": 1000, "width": 256, "height": 256, "seed": 1}


class Call(threading.Thread):
    """A request in the background; .response once it is answered."""

    def __init__(self, url, body, timeout=120):
        super().__init__(daemon=True)
        self.url, self.body, self.timeout, self.response, self.error = url, body, timeout, None, None
        self.start()

    def run(self):
        try:
            self.response = requests.post(self.url, json=self.body, timeout=self.timeout)
        except requests.RequestException as e:
            self.error = e

    def result(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), "the request was not answered"
        return self.response


def job(server, job_id):
    return requests.get(f"{server.base}/sdrt/v1/jobs/{job_id}", timeout=10).json()


def running(server, job_id, step=1):
    wait_until(lambda: job(server, job_id).get("state") == "running" and job(server, job_id)["step"] >= step,
               what=f"job {job_id} running")


def test_queue_full_status_position_events_and_cancel():
    with running_server(settings=Settings(queue=2, batch_window_s=0.0)) as s:
        url = s.base + "/sdapi/v1/txt2img"
        first = Call(url, {**SLOW, "force_task_id": "first"})
        running(s, "first", step=2)
        waiting = []
        for i in range(2):  # one after the other: their queue positions are then known
            waiting.append(Call(url, {**SLOW, "steps": 5, "force_task_id": f"w{i}"}))
            wait_until(lambda: s.service.counts()["queued"] == i + 1, what=f"{i + 1} jobs queued")
        assert [job(s, f"w{i}")["queue_position"] for i in range(2)] == [0, 1]
        full = requests.post(url, json=SLOW, timeout=10)
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"] == "QueueFull" and full.json()["detail"] == \
            "the queue is full (2 jobs waiting; sdrt serve --queue N); retry later"
        status = job(s, "first")
        assert status["state"] == "running" and status["steps"] == 1000 and 0 < status["progress"] < 1
        assert status["eta"] > 0
        progress = requests.get(s.base + "/sdapi/v1/progress", timeout=10).json()
        assert progress["current_task"] == "first" and progress["state"]["sampling_steps"] == 1000
        with requests.get(f"{s.base}/sdrt/v1/jobs/first/events", stream=True, timeout=30) as events:
            lines = events.iter_lines()
            seen = [json.loads(next(line for line in lines if line)[len(b"data: "):]) for _ in range(3)]
            assert [e["id"] for e in seen] == ["first"] * 3 and seen[0]["step"] < seen[2]["step"]
            assert requests.delete(f"{s.base}/sdrt/v1/jobs/first", timeout=10).json()["state"] == "cancelled"
            last = [json.loads(line[len(b"data: "):]) for line in lines if line]
            assert last[-1]["state"] == "cancelled"  # the stream ends with the job
        r = first.result()
        assert r.status_code == 409 and r.json()["detail"] == "job first was cancelled by the client"
        assert all(w.result().status_code == 200 for w in waiting)  # the queue moved on


def test_interrupt_returns_what_is_done_and_skip_moves_on():
    with running_server(settings=Settings(batch_window_s=0.0)) as s:
        url = s.base + "/sdapi/v1/txt2img"
        call = Call(url, {**SLOW, "force_task_id": "i"})
        running(s, "i", step=3)
        assert requests.post(s.base + "/sdapi/v1/interrupt", timeout=10).json() == {}
        r = call.result()
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert job(s, "i")["interrupted"] and job(s, "i")["step"] < 1000
        call = Call(url, {**SLOW, "n_iter": 2, "steps": 400, "force_task_id": "k"})
        running(s, "k", step=2)
        assert requests.post(s.base + "/sdapi/v1/skip", timeout=10).json() is None
        r = call.result()
        assert r.status_code == 200 and len(r.json()["images"]) == 2  # the skipped one as it was, then the next
        assert json.loads(r.json()["info"])["all_seeds"] == [1, 2]


def test_a_client_that_leaves_cancels_its_job_and_timeouts_end_jobs():
    with running_server(settings=Settings(batch_window_s=0.0, job_timeout_s=2.0)) as s:
        url = s.base + "/sdapi/v1/txt2img"
        with pytest.raises(requests.Timeout):
            requests.post(url, json={**SLOW, "force_task_id": "gone"}, timeout=1.0)
        wait_until(lambda: job(s, "gone")["state"] == "cancelled", what="the abandoned job cancelled")
        assert job(s, "gone")["error"]["message"] == "job gone was cancelled: its client disconnected"
        r = requests.post(url, json={**SLOW, "force_task_id": "slow"}, timeout=30)
        assert r.status_code == 504 and r.json()["error"] == "JobTimedOut"
        assert r.json()["detail"].startswith("job slow ran past its timeout")
        assert requests.post(url, json={**SLOW, "steps": 3}, timeout=30).status_code == 200


PROMPTS = ["a small red circle on a blue background", "a large green square on a white background",
           "a yellow triangle on a black background, (bright:1.3)", "a blue star"]


def _together(s, bodies):
    """The bodies' jobs all waiting at once: queued behind a slow job, which is then cancelled."""
    blocker = Call(s.base + "/sdapi/v1/txt2img", {**SLOW, "force_task_id": "blocker"})
    running(s, "blocker")
    calls = [Call(s.base + "/sdapi/v1/txt2img", b) for b in bodies]
    wait_until(lambda: s.service.counts()["queued"] == len(bodies), what="every job queued")
    requests.delete(f"{s.base}/sdrt/v1/jobs/blocker", timeout=10)
    assert blocker.result().status_code == 409
    return [c.result() for c in calls]


def test_batched_jobs_equal_the_same_jobs_alone():
    bodies = [{"prompt": p, "negative_prompt": "blurry" if i % 2 else "", "steps": 6, "seed": 10 * i,
               "cfg_scale": 4.0 + i, "sampler_name": "Euler a", "batch_size": 1 + (i == 1)} for i, p in enumerate(PROMPTS)]
    with running_server(settings=Settings(batch_window_s=1.0, max_batch=8)) as s:
        together = _together(s, bodies)
        assert s.service.stats["batched_jobs"] == len(bodies) and s.service.stats["batched_runs"] == 1
    with running_server(settings=Settings(max_batch=1)) as s:
        alone = [requests.post(s.base + "/sdapi/v1/txt2img", json=b, timeout=60) for b in bodies]
        assert s.service.stats["batched_runs"] == 0
    worst = 0
    for a, b in zip(together, alone):
        assert a.status_code == b.status_code == 200
        for x, y in zip(a.json()["images"], b.json()["images"]):
            worst = max(worst, int(np.abs(pixels(decoded(x)) - pixels(decoded(y))).max()))
            assert decoded(x).info["parameters"] == decoded(y).info["parameters"]
    assert worst <= 1  # measured 0/255 on the embedded model (AMD EPYC, ONNX Runtime 1.32)


def test_jobs_that_cannot_share_run_alone():
    bodies = [{"prompt": PROMPTS[0], "steps": 4, "seed": 1}, {"prompt": PROMPTS[1], "steps": 5, "seed": 1},
              {"prompt": " ".join(["word"] * 90), "steps": 4, "seed": 1}]  # 2 chunks of 77 tokens
    with running_server(settings=Settings(batch_window_s=0.5)) as s:
        assert all(r.status_code == 200 for r in _together(s, bodies))
        assert s.service.stats["batched_runs"] == 0


def test_a_failing_job_fails_alone():
    bodies = [{"prompt": p, "steps": 4, "seed": i, "cfg_scale": 7.0} for i, p in enumerate(PROMPTS[:3])]
    bodies[1]["cfg_scale"] = 1e38  # guidance overflows: the U-Net's output turns non-finite in that job's rows
    with running_server(settings=Settings(batch_window_s=1.0)) as s:
        ok, bad, ok2 = _together(s, bodies)
        assert s.service.stats["fallbacks"] == 1
        assert ok.status_code == ok2.status_code == 200
        assert bad.status_code == 500 and bad.json()["error"] == "NonFiniteOutput"
        assert bad.json()["detail"].startswith("non-finite values (NaN/Inf) in the output of the U-Net at step")
        pipe = s.service._pipes[0]["sdrt-embedded"]
        decoder = pipe.engines["vae_decoder"]

        def failing(**feeds):  # a fault ONNX Runtime can't be made to produce on demand
            pipe.engines["vae_decoder"] = decoder
            from sdrt.errors import EngineError
            raise EngineError("vae_decoder failed: injected")
        pipe.engines["vae_decoder"] = failing
        r = requests.post(s.base + "/sdapi/v1/txt2img", json=bodies[0], timeout=60)
        assert r.status_code == 500 and r.json()["detail"] == "vae_decoder failed: injected"
        again = requests.post(s.base + "/sdapi/v1/txt2img", json=bodies[0], timeout=60)
        assert again.status_code == 200 and again.json()["images"] == ok.json()["images"]


def test_batches_stay_within_the_pixel_budget():
    bodies = [{"prompt": p, "steps": 3, "seed": i} for i, p in enumerate(PROMPTS)]  # 64x64 each
    with running_server(settings=Settings(batch_window_s=1.0, max_batch=8, max_batch_pixels=2 * 64 * 64)) as s:
        assert all(r.status_code == 200 for r in _together(s, bodies))
        assert s.service.stats["batched_runs"] == 2 and s.service.stats["batched_jobs"] == 4


def test_two_workers_run_two_jobs_at_once():
    with running_server(settings=Settings(batch_window_s=0.0, workers=2)) as s:
        url = s.base + "/sdapi/v1/txt2img"
        calls = [Call(url, {**SLOW, "seed": i, "force_task_id": f"p{i}"}) for i in range(2)]
        for i in range(2):
            running(s, f"p{i}")  # both running: each worker has its own copy of the model
        assert len(s.service.running()) == 2 and len(s.service._pipes) == 2
        for i in range(2):
            requests.delete(f"{s.base}/sdrt/v1/jobs/p{i}", timeout=10)
        assert [c.result().status_code for c in calls] == [409, 409]
