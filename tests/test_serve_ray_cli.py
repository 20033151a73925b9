"""`sdrt serve --ray` as a user runs it: a local Ray instance, one replica, a request, SIGTERM, a clean exit."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import requests

from serve_helpers import free_port, wait_until

pytest.importorskip("ray.serve")


def test_sdrt_serve_ray_serves_and_stops():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", "--ray", "--replicas", "1", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            if proc.poll() is not None:
                raise AssertionError(f"sdrt serve --ray exited: {proc.stdout.read()[-3000:]}")
            try:
                return requests.get(base + "/sdapi/v1/sd-models", timeout=2).ok
            except requests.RequestException:  # not listening yet, or too busy starting to answer in time
                return False
        wait_until(up, timeout=120, what="sdrt serve --ray answering")
        r = requests.post(base + "/sdapi/v1/txt2img", json={"prompt": "a red square", "steps": 2, "seed": 1},
                          timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        out = proc.stdout.read()
        assert "sdrt serve --ray: http://127.0.0.1:" in out and "sdrt serve --ray: stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
