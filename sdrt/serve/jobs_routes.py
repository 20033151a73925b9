"""sdrt's own routes: a job's status, its server-sent events and its cancel; A1111's /internal routes."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from .waiting import streaming_status
from ..errors import NotFound
from .jobs import DONE, FINAL, QUEUED, RUNNING

router = APIRouter()


def _service(request: Request):
    return request.app.state.service


@router.get("/sdrt/v1/jobs/{job_id}")
def job_status(job_id: str, request: Request):
    return _service(request).status(job_id)


@router.get("/sdrt/v1/jobs/{job_id}/events")
def job_events(job_id: str, request: Request):
    service = _service(request)
    service.status(job_id)  # a 404 before the stream starts
    return streaming_status(job_id, request, service)


@router.delete("/sdrt/v1/jobs/{job_id}")
def cancel_job(job_id: str, request: Request):
    return _service(request).cancel_id(job_id)


@router.get("/sdrt/v1/health")
def health(request: Request):
    service = _service(request)
    return {"models": [m.title for m in service.models.models], **service.counts(), "closing": service.closing}


class _TaskQuery(BaseModel):
    id_task: str
    id_live_preview: int = -1


@router.post("/internal/progress")
def internal_progress(query: _TaskQuery, request: Request):
    """A1111's per-task progress (what force_task_id is for)."""
    try:
        s = _service(request).status(query.id_task)
    except NotFound:
        return {"active": False, "queued": False, "completed": False, "progress": None, "eta": None,
                "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting..."}
    return {"active": s["state"] == RUNNING, "queued": s["state"] == QUEUED, "completed": s["state"] in FINAL,
            "progress": s["progress"], "eta": s["eta"], "live_preview": None, "id_live_preview": -1,
            "textinfo": "Done" if s["state"] == DONE else None}


@router.get("/queue/status")
def queue_status(request: Request):
    """Gradio's queue route, which some clients (Krita's cyanic-sd plugin) ping before the API."""
    counts = _service(request).counts()
    return {"msg": "estimation", "queue_size": counts["queued"], "running": counts["running"]}


@router.get("/internal/ping")
def ping():
    return {}
