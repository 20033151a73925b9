"""`sdrt serve` as a process: it binds where told, SIGTERM drains (the running job finishes, waiting ones are
cancelled, new connections are refused) and it exits 0; a bounded load leaves memory flat, with no 500s."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from sdrt.serve import Settings
from serve_helpers import free_port, running_server, wait_until


def _start(*args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--port", str(port), "--batch-window", "0",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(base + "/sdapi/v1/sd-models", timeout=1).ok
        except requests.RequestException:  # not listening yet, or too busy starting to answer in time
            if proc.poll() is not None:
                raise AssertionError(f"sdrt serve exited: {proc.stdout.read()}")
            return False
    wait_until(up, timeout=60, what="sdrt serve listening")
    return proc, base


def test_sigterm_drains_and_exits():
    proc, base = _start("--drain-timeout", "60")
    try:
        results = {}

        def call(name, body):
            results[name] = requests.post(base + "/sdapi/v1/txt2img", json=body, timeout=120)
        slow = {"prompt": "a red square", "steps": 120, "width": 256, "height": 256, "seed": 1}
        threads = [threading.Thread(target=call, args=("running", {**slow, "force_task_id": "r"}))]
        threads[0].start()
        wait_until(lambda: requests.get(base + "/sdrt/v1/jobs/r", timeout=5).json().get("step", 0) >= 2,
                   what="the first job running")
        threads.append(threading.Thread(target=call, args=("waiting", {**slow, "steps": 2})))
        threads[1].start()
        wait_until(lambda: requests.get(base + "/sdrt/v1/health", timeout=5).json()["queued"] == 1,
                   what="the second job queued")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert results["running"].status_code == 200 and len(results["running"].json()["images"]) == 1
        assert results["waiting"].status_code == 409
        assert results["waiting"].json()["detail"].endswith("was cancelled before it started: the server is "
                                                            "shutting down")
        assert proc.wait(60) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(base + "/sdapi/v1/options", timeout=2)
        assert "sdrt serve: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_refuses_bad_flags_in_one_line():
    out = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", "--max-batch", "0"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == "error: --max-batch must be from 1 to 64, got 0"
    out = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", "--api-auth", "nopassword"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == \
        "error: --api-auth takes USER:PASS[,USER:PASS], got 'nopassword'"


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_bounded_load_no_500_none_lost_memory_flat():
    """Hundreds of requests from 12 client threads against a queue of 4: each answer is a 200 or a 503, every
    request is answered, and RSS after a second round is within 64 MB of after the first."""
    rounds, per_thread, threads = 2, 12, 12
    codes: list[int] = []
    lock = threading.Lock()
    with running_server(settings=Settings(queue=4, batch_window_s=0.01, max_batch=8)) as s:
        def client(k):
            for i in range(per_thread):
                body = {"prompt": f"a red square {k}", "steps": 2, "seed": k * 100 + i, "cfg_scale": 5 + i % 3}
                r = requests.post(s.base + "/sdapi/v1/txt2img", json=body, timeout=60)
                with lock:
                    codes.append(r.status_code)
                if r.status_code == 200:
                    assert len(r.json()["images"]) == 1
        rss = []
        started = time.time()
        for _ in range(rounds):
            pool = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join(120)
            assert not any(t.is_alive() for t in pool), "the load did not finish within its bound"
            rss.append(_rss_mb())
        assert time.time() - started < 240
        assert len(codes) == rounds * threads * per_thread  # none lost
        assert set(codes) <= {200, 503} and codes.count(200) > 0, sorted(set(codes))
        assert rss[1] - rss[0] < 64, rss
        assert all(not job._images for job in list(s.service._jobs.values()))  # no finished job keeps its images
