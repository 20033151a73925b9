"""Run the app on uvicorn. SIGTERM or Ctrl-C drains: the listening socket closes, waiting jobs are cancelled (their
clients get a 409), running jobs finish within the drain timeout (then are cancelled), and the process exits."""
from __future__ import annotations

import contextlib
import sys

from .app import Access, create_app
from .models import ModelSet
from .queue import Service, Settings


def serve_forever(models: ModelSet, settings: Settings, access: Access, host: str, port: int,
                  drain_s: float = 30.0, log=print) -> None:
    import uvicorn

    service = Service(models, settings).start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the signal: stop taking jobs first, then uvicorn's graceful exit
            service.drain()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn re-raises the signal once it has stopped: a drained exit is a clean one
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    server = Server(uvicorn.Config(create_app(service, access), host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=max(int(drain_s), 1)))
    shown = ", ".join(m.title for m in models.models)
    log(f"sdrt serve: http://{host}:{port} (models: {shown}; queue {settings.queue}, batch up to "
        f"{settings.max_batch} images within {settings.batch_window_s * 1000:.0f} ms, {settings.workers} worker(s))")
    try:
        server.run()
    finally:
        service.close(drain_s)
        log("sdrt serve: stopped")
    if not server.started:  # the port was taken, or the host can't be bound: uvicorn said why
        sys.exit(1)
