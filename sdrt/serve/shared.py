"""What AUTOMATIC1111 keeps global, kept server-wide: the chosen model and options, /interrupt and /skip, and a
view of every job. One server: in this process. Ray Serve: a hub actor that every replica reads and writes, so a
model switch, an interrupt or a job's status is the same whichever replica a request lands on."""
from __future__ import annotations

import threading
import time

KEEP_FINISHED_S = 120.0  # how long other replicas still see a finished job's status


class Chosen:
    """The model and options clients chose (POST /options): one server's, or the hub's for all replicas."""

    def __init__(self, default_title: str):
        self._current, self._options = default_title, {}

    def settings(self) -> tuple[str, dict]:
        return self._current, dict(self._options)

    def set_settings(self, current: str, options: dict) -> None:
        self._current = current
        self._options.update(options)


class Local(Chosen):
    """One server's own state."""

    def broadcast(self, kind: str, arg: str | None = None) -> None:
        """interrupt / skip / cancel for other replicas: there are none."""

    def others(self) -> list[dict]:
        """Job statuses other replicas published."""
        return []

    def close(self) -> None:
        pass


class Hub(Chosen):
    """The Ray actor behind OnHub (ray.remote(Hub)): settings, a numbered command log, replicas' job statuses."""

    def __init__(self, default_title: str):
        super().__init__(default_title)
        self.commands: list[tuple[int, str, str | None, str]] = []  # (seq, kind, arg, origin replica)
        self.seq = 0
        self.published: dict[str, tuple[float, list[dict]]] = {}

    def command(self, kind: str, arg: str | None, origin: str) -> None:
        self.seq += 1
        self.commands = [*self.commands[-999:], (self.seq, kind, arg, origin)]

    def commands_since(self, seq: int) -> tuple[int, list]:
        return self.seq, [c for c in self.commands if c[0] > seq]

    def publish(self, replica: str, statuses: list[dict]) -> None:
        self.published[replica] = (time.time(), statuses)

    def others(self, replica: str) -> list[dict]:
        fresh = time.time() - 10.0  # a replica that stopped publishing is gone
        return [s for r, (t, ss) in self.published.items() if r != replica and t > fresh for s in ss]


class OnHub(Local):
    """A replica's view of the hub, and the thread that publishes its jobs and applies others' commands."""

    def __init__(self, hub, replica: str, service, period_s: float = 0.2):
        import ray

        self._ray, self.hub, self.replica, self.service = ray, hub, replica, service
        self._seq = ray.get(hub.commands_since.remote(0))[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync, args=(period_s,), name="sdrt-hub-sync", daemon=True)
        self._thread.start()

    def settings(self):
        return self._ray.get(self.hub.settings.remote())

    def set_settings(self, current, options):
        self._ray.get(self.hub.set_settings.remote(current, options))

    def broadcast(self, kind, arg=None):
        self._ray.get(self.hub.command.remote(kind, arg, self.replica))

    def others(self):
        return self._ray.get(self.hub.others.remote(self.replica))

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def _sync(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self._seq, commands = self._ray.get(self.hub.commands_since.remote(self._seq))
                for _, kind, arg, origin in commands:
                    if origin != self.replica:
                        self.service.apply(kind, arg)
                self.hub.publish.remote(self.replica, self.service.local_statuses(KEEP_FINISHED_S))
            except Exception:  # the hub restarting: try again next period
                continue
