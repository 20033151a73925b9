"""`sdrt serve`: AUTOMATIC1111's HTTP API over sdrt's pipelines, with a job queue that batches (the `serve` extra:
FastAPI + uvicorn; `ray` adds scale-out on Ray Serve).

    models = ModelSet([Path("bundle")]); service = Service(models, Settings()).start()
    app = create_app(service, Access())   # any ASGI server; `sdrt serve` runs uvicorn
"""
from __future__ import annotations

from .models import LoadOptions, ModelSet
from .queue import Service, Settings


def create_app(service, access=None):
    from .app import Access, create_app as _create
    return _create(service, access or Access())


__all__ = ["LoadOptions", "ModelSet", "Service", "Settings", "create_app"]
