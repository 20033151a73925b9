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
def cluster(tmp_path_factory):
    import shutil

    from sdrt import embedded
    from sdrt.serve import ModelSet, Settings
    from sdrt.serve import ray_serve
    from sdrt.serve.app import Access

    second = tmp_path_factory.mktemp("served") / "second"  # the embedded bundle under another name
    shutil.copytree(embedded.BUNDLE, second)
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        ray_serve.start(ModelSet([None, second]), Settings(batch_window_s=0.01), Access(), "127.0.0.1", port,
                        replicas=2)
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


SLOW = {"prompt": "a red square", "steps": 1000, "width": 256, "height": 256, "seed": 1}


def _background(base, body):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", requests.post(base + "/sdapi/v1/txt2img", json=body,
                                                                          timeout=120)), daemon=True)
    t.start()
    return t, out


def _step(r) -> int:
    """A job's step, or -1 where the replica answering hasn't heard of it yet."""
    return r.json()["step"] if r.ok else -1


def test_options_progress_jobs_and_interrupt_are_the_same_on_every_replica(cluster):
    import json

    get = lambda path: requests.get(cluster + path, timeout=10)  # noqa: E731
    try:
        assert requests.post(cluster + "/sdapi/v1/options", json={"sd_model_checkpoint": "second",
                                                                  "CLIP_stop_at_last_layers": 2}, timeout=10).ok
        answers = [_post(cluster, i) for i in range(10)]
        assert len({r.headers["x-sdrt-replica"] for r in answers}) == 2
        infos = [json.loads(r.json()["info"]) for r in answers]
        assert {(i["sd_model_name"], i["clip_skip"]) for i in infos} == {("second", 2)}
        assert {get("/sdapi/v1/options").json()["sd_model_checkpoint"] for _ in range(6)} == \
            {f"second [{infos[0]['sd_model_hash']}]"}
    finally:
        requests.post(cluster + "/sdapi/v1/options", json={"sd_model_checkpoint": "sdrt-embedded",
                                                          "CLIP_stop_at_last_layers": 1}, timeout=10)
    thread, out = _background(cluster, {**SLOW, "force_task_id": "far"})
    wait_until(lambda: _step(get("/sdrt/v1/jobs/far")) >= 2, what="the job running")
    def everywhere():  # once its replica has published it (every 0.2 s), both replicas answer for it
        seen = [get("/sdrt/v1/jobs/far") for _ in range(8)]
        return {r.status_code for r in seen} == {200} and len({r.headers["x-sdrt-replica"] for r in seen}) == 2
    wait_until(everywhere, timeout=15, what="the job seen from both replicas")
    wait_until(lambda: {get("/sdapi/v1/progress").json()["current_task"] for _ in range(6)} == {"far"}, timeout=15,
               what="/progress naming the job on both replicas")
    assert requests.post(cluster + "/sdapi/v1/interrupt", timeout=10).json() == {}
    thread.join(60)
    assert out["r"].status_code == 200 and get("/sdrt/v1/jobs/far").json()["interrupted"]
    thread, out = _background(cluster, {**SLOW, "force_task_id": "gone"})
    wait_until(lambda: _step(get("/sdrt/v1/jobs/gone")) >= 2, what="the second job running")
    wait_until(lambda: all(get("/sdrt/v1/jobs/gone").ok for _ in range(6)), timeout=15,
               what="the second job seen from both replicas")
    for _ in range(4):  # from whichever replica answers: the job's own, or the other via the hub
        requests.delete(cluster + "/sdrt/v1/jobs/gone", timeout=10)
    thread.join(60)
    assert out["r"].status_code == 409
    # every replica says so once the job's own has published it (each publishes every 0.2 s)
    wait_until(lambda: all(get("/sdrt/v1/jobs/gone").json()["state"] == "cancelled" for _ in range(4)), timeout=15,
               what="the cancel seen on both replicas")


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
    assert set(codes) <= {200, 500, 503}, sorted(set(map(str, codes)))
    assert codes[killed_at:].count(200) >= 20
    deadline = time.time() + 60
    while time.time() < deadline:  # the replacement serves too
        seen = {_post(cluster, 1).headers["x-sdrt-replica"] for _ in range(8)}
        if len(seen) == 2:
            break
    assert len(seen) == 2
