"""How a request waits for its job (and notices its client leaving), and a job's status as server-sent events."""
from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import SdrtError
from .jobs import FINAL, Job
from .queue import Service

POLL_S = 0.1  # how often a waiting request checks its client is still there


async def wait_for(job: Job, request: Request, service: Service) -> None:
    """Until the job ends. A client that goes away cancels it; the job's timeout ends the wait with a 504."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    job.on_final(lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))
    try:
        while not done.done():
            await asyncio.wait({done}, timeout=POLL_S)
            if done.done():
                break
            job.check_deadline()
            if not job.is_final and await request.is_disconnected():
                service.cancel(job, "cancelled: its client disconnected")
    except asyncio.CancelledError:  # the server is stopping this request (shutdown past the drain timeout)
        service.cancel(job, "cancelled: the server stopped waiting for it")
        raise
    if job.error is not None:
        raise job.error


def streaming_status(job_id: str, request: Request, service: Service) -> StreamingResponse:
    """Server-sent events: the job's status on every change (another replica's: as it publishes it), until it
    ends or the client leaves."""
    async def events():
        sent = None
        while True:
            try:
                status = service.status(job_id)
            except SdrtError:  # forgotten (a replica gone): the stream ends
                return
            changed = {k: v for k, v in status.items() if k != "eta"}
            if changed != sent:
                sent = changed
                yield f"data: {json.dumps(status)}\n\n"
            if status["state"] in FINAL:
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


