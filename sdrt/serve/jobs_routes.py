"""sdrt's own routes: a job's status, its server-sent events and its cancel; A1111's /internal routes."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from .app import streaming_status
from .jobs import DONE

router = APIRouter()


def _service(request: Request):
    return request.app.state.service


@router.get("/sdrt/v1/jobs/{job_id}")
def job_status(job_id: str, request: Request):
    service = _service(request)
    job = service.get(job_id)
    return job.status(service.position(job))


@router.get("/sdrt/v1/jobs/{job_id}/events")
def job_events(job_id: str, request: Request):
    service = _service(request)
    return streaming_status(service.get(job_id), request, service)


@router.delete("/sdrt/v1/jobs/{job_id}")
def cancel_job(job_id: str, request: Request):
    service = _service(request)
    job = service.get(job_id)
    service.cancel(job)
    return job.status(None)


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
    service = _service(request)
    job = service.find(query.id_task)
    if job is None:
        return {"active": False, "queued": False, "completed": False, "progress": None, "eta": None,
                "live_preview": None, "id_live_preview": -1, "textinfo": "Waiting..."}
    s = job.status(service.position(job))
    return {"active": s["state"] == "running", "queued": s["state"] == "queued", "completed": job.is_final,
            "progress": s["progress"], "eta": s["eta"], "live_preview": None, "id_live_preview": -1,
            "textinfo": None if job.state != DONE else "Done"}


@router.get("/internal/ping")
def ping():
    return {}
