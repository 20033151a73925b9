"""sdrt serve on Ray Serve: a local Ray instance, two CPU replicas of the same app; both serve, and when one
replica's actor is killed mid-load its in-flight requests end with an answer while the other keeps serving and
Ray starts a replacement."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from serve_helpers import free_port, wait_until

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def cluster():
    from sdrt.serve import ModelSet, Settings
    from sdrt.serve import ray_serve
    from sdrt.serve.app import Access

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        ray_serve.start(ModelSet([]), Settings(batch_window_s=0.01), Access(), "127.0.0.1", port, replicas=2)
        yield f"http://127.0.0.1:{port}"
    finally:
        ray_serve.stop()


def _replicas() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SdrtReplica" in a["name"])


def _post(base, seed, timeout=60):
    return requests.post(base + "/sdapi/v1/txt2img", json={"prompt": "a red square", "steps": 3, "seed": seed},
                         timeout=timeout)


def test_two_replicas_serve_the_same_images(cluster):
    answers = [_post(cluster, 5) for _ in range(16)]
    assert {r.status_code for r in answers} == {200}
    assert len({r.headers["x-sdrt-replica"] for r in answers}) == 2  # both replicas answered
    assert len({r.json()["images"][0] for r in answers}) == 1  # and made the same image
    bad = requests.post(cluster + "/sdapi/v1/txt2img", json={"width": 63}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"] == "InvalidRequest"


def test_a_killed_replica_is_replaced_while_the_other_serves(cluster):
    before = _replicas()
    assert len(before) == 2
    codes, stop = [], threading.Event()

    def load(k):
        i = 0
        while not stop.is_set() and i < 200:
            try:
                codes.append(_post(cluster, k * 1000 + i, timeout=60).status_code)
            except requests.RequestException as e:  # an answer must come: a hang or a reset is a failure
                codes.append(type(e).__name__)
            i += 1
    clients = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for c in clients:
        c.start()
    wait_until(lambda: len(codes) >= 8, what="load running")
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    killed_at = len(codes)
    wait_until(lambda: len(codes) >= killed_at + 20, timeout=60, what="the other replica serving")
    wait_until(lambda: len(_replicas()) == 2 and before[0] not in _replicas(), timeout=90,
               what="Ray replacing the killed replica")
    stop.set()
    for c in clients:
        c.join(90)
    assert not any(c.is_alive() for c in clients)
    print("ray codes", {c: codes.count(c) for c in set(codes)})
    assert set(codes) <= {200, 500, 503}, sorted(set(map(str, codes)))
    assert codes[killed_at:].count(200) >= 20
    deadline = time.time() + 60
    while time.time() < deadline:  # the replacement serves too
        seen = {_post(cluster, 1).headers["x-sdrt-replica"] for _ in range(8)}
        if len(seen) == 2:
            break
    assert len(seen) == 2
