"""The FastAPI app: AUTOMATIC1111's /sdapi/v1 routes (a1111_routes.py) and sdrt's own /sdrt/v1 jobs routes over a
Service, behind optional Basic/Bearer auth, with A1111's error shape and a body size limit."""
from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import QueueFull, SdrtError
from . import a1111_routes, jobs_routes
from .jobs import status_of
from .queue import Service

_REPLICA = f"{socket.gethostname()}:{os.getpid()}".encode()  # which process answered (Ray Serve has several)


@dataclass(frozen=True)
class Access:
    users: tuple[tuple[str, str], ...] = ()  # --api-auth USER:PASS,...
    keys: tuple[str, ...] = ()  # --api-key KEY (Authorization: Bearer KEY)
    max_body_bytes: int = 32 * 2**20
    max_prompt_chars: int = 8192


def error_body(error: str, detail: str, errors: str) -> dict:
    """A1111's api_middleware shape."""
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def create_app(service: Service, access: Access = Access()) -> FastAPI:
    app = FastAPI(title="sdrt", version=__version__, description="AUTOMATIC1111's /sdapi/v1 API and sdrt's jobs API")
    app.state.service, app.state.access = service, access
    _errors(app)
    app.add_middleware(_Limits, max_body=access.max_body_bytes)
    guard = [Depends(_authenticate)]
    app.include_router(a1111_routes.router, dependencies=guard)
    app.include_router(a1111_routes.controlnet_router, dependencies=guard)
    app.include_router(jobs_routes.router, dependencies=guard)
    return app


def _authenticate(request: Request) -> None:
    access: Access = request.app.state.access
    if not access.users and not access.keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and access.keys:
        if any(secrets.compare_digest(value.strip().encode(), k.encode()) for k in access.keys):
            return
        raise _unauthorized("Incorrect API key")
    if scheme.lower() == "basic" and access.users:
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthorized("Incorrect username or password") from None
        if any(secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
               for u, p in access.users):
            return
        raise _unauthorized("Incorrect username or password")
    raise _unauthorized("Not authenticated")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Basic"})


def _errors(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body("HTTPException", str(e.detail), f"{e.status_code}: {e.detail}"),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(SdrtError)
    async def sdrt_error(request: Request, e: SdrtError):
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, QueueFull) else None
        return JSONResponse(error_body(type(e).__name__, str(e), f"{status_of(e)}: {e}"), status_code=status_of(e),
                            headers=headers)

    @app.exception_handler(Exception)
    async def other_error(request: Request, e: Exception):  # a bug or a failing engine: the job fails, not the server
        return JSONResponse(error_body(type(e).__name__, "", str(e)), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):  # FastAPI's own 422 body, as A1111 answers
        return JSONResponse({"detail": _jsonable(e.errors())}, status_code=422)


def _jsonable(errors) -> list:
    return json.loads(json.dumps(errors, default=str))


class _Limits:
    """X-Process-Time on every response (A1111 sets it); a body over max_body is a 413 before it is read whole."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, limit = time.perf_counter(), self.max_body
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await JSONResponse(**_too_large(int(declared), limit))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(**_too_large(seen, limit, key="detail"))
            return message

        async def timed(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-process-time", f"{time.perf_counter() - started:.4f}".encode()),
                                      (b"x-sdrt-replica", _REPLICA)]
            await send(message)
        await self.app(scope, counted, timed)


def _too_large(size: int, limit: int, key: str = "content") -> dict:
    detail = f"the request body is over {limit} bytes ({size} or more); sdrt serve --max-body-mb raises the limit"
    return {key: detail if key == "detail" else error_body("HTTPException", detail, f"413: {detail}"),
            "status_code": 413}


__all__ = ["Access", "create_app", "error_body"]
