"""`sdrt serve --ray`: the same FastAPI app as a Ray Serve deployment. Each replica builds its own Service in its
constructor (models loaded once per replica, its own queue and batching; no module state crosses processes), and
Ray's HTTP proxy spreads requests over the replicas and replaces one that dies.

What A1111 keeps global is kept in a hub actor (shared.py): the model and options a POST /options sets, /interrupt
and /skip, and every replica's job statuses, so /progress, /sdrt/v1/jobs/{id} and its cancel answer the same on
any replica. Responses carry X-Sdrt-Replica: which process answered.
"""
from __future__ import annotations

import signal
import threading

from ..errors import MissingDependency
from .app import Access, create_app
from .models import ModelSet
from .queue import Service, Settings

APP_NAME = "sdrt"


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MissingDependency("sdrt serve --ray needs Ray Serve: pip install 'sdrt[ray]'") from None
    return ray, serve


def deployment(models: ModelSet, settings: Settings, access: Access, replicas: int, cpus: float = 1.0,
               gpus: float = 0.0, hub=None):
    """The bound Ray Serve application: `replicas` copies of the app, each reserving cpus/gpus, sharing `hub`."""
    _, serve = _ray()

    @serve.ingress()
    class SdrtReplica:
        def __init__(self, models: ModelSet, settings: Settings, access: Access, hub):
            import os
            import socket

            from .shared import OnHub

            self.service = Service(models, settings)
            if hub is not None:
                self.service.shared = OnHub(hub, f"{socket.gethostname()}:{os.getpid()}", self.service)
            self.service.start()
            self.asgi = create_app(self.service, access)

        def __serve_build_asgi_app__(self):
            return self.asgi

        def __del__(self):
            self.service.close(drain_s=5)

    # Ray queues up to max_ongoing_requests per replica; sdrt's own queue (and its 503) sits behind that.
    ongoing = max(settings.queue + settings.max_batch, 8)
    return serve.deployment(SdrtReplica, name="SdrtReplica", num_replicas=replicas, max_ongoing_requests=ongoing,
                            health_check_period_s=2.0, health_check_timeout_s=30.0,
                            ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}).bind(models, settings, access, hub)


def start(models: ModelSet, settings: Settings, access: Access, host: str, port: int, replicas: int,
          address: str | None = None, cpus: float = 1.0, gpus: float = 0.0) -> None:
    """Connect to (or start) Ray, start Serve's proxy on host:port and deploy; returns once replicas are up."""
    ray, serve = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    if models.options.threads is None and cpus >= 1:  # replicas on one machine share its cores
        from dataclasses import replace
        models.options = replace(models.options, threads=int(cpus))
    from .shared import Hub
    hub = ray.remote(Hub).options(name="sdrt-hub", num_cpus=0, get_if_exists=True).remote(models.default.title)
    serve.run(deployment(models, settings, access, replicas, cpus, gpus, hub), name=APP_NAME, route_prefix="/",
              blocking=False)


def stop() -> None:
    ray, serve = _ray()
    serve.shutdown()
    ray.shutdown()


def serve_on_ray(models, settings, access, host, port, replicas, address, cpus, gpus, log=print) -> None:
    """`sdrt serve --ray`: deploy, then wait for SIGTERM or Ctrl-C and shut Serve down."""
    ray, _ = _ray()
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: done.set())
    try:
        start(models, settings, access, host, port, replicas, address, cpus, gpus)
        log(f"sdrt serve --ray: http://{host}:{port} ({replicas} replica(s); models: "
            f"{', '.join(m.title for m in models.models)})")
        done.wait()
    finally:
        stop()
        log("sdrt serve --ray: stopped")
