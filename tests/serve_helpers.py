"""Start sdrt's server in a thread on a free loopback port, and stop it: what the serving tests share."""
from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from sdrt.serve import ModelSet, Service, Settings  # noqa: E402
from sdrt.serve.app import Access, create_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, service: Service, app, port: int, thread, server):
        self.service, self.app, self.port, self._thread, self._server = service, app, port, thread, server
        self.base = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.service.drain()
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.service.close(drain_s=10)


@contextmanager
def running_server(bundles=(), settings: Settings = Settings(), access: Access = Access(), models=None):
    import uvicorn

    service = Service(models or ModelSet(list(bundles)), settings).start()
    app = create_app(service, access)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start within 30 s")
        time.sleep(0.02)
    running = Running(service, app, port, thread, server)
    try:
        yield running
    finally:
        running.stop()


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.int16)


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)
