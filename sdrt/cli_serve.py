"""`sdrt serve`: the HTTP server (sdrt.serve), on uvicorn or as a Ray Serve deployment."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_base import app, handle_errors
from .errors import InvalidRequest, MissingDependency


@app.command()
@handle_errors
def serve(
    model: list[Path] = typer.Option([], "--model", "-m", help="A bundle to serve (repeatable; the first is the "
                                     "default model). None: the embedded demo model."),
    host: str = typer.Option("127.0.0.1", "--host", help="Where to listen: loopback unless you say otherwise."),
    port: int = typer.Option(7860, "--port", help="A1111's port by default."),
    api_auth: Optional[str] = typer.Option(None, "--api-auth", help="HTTP Basic: USER:PASS[,USER:PASS]."),
    api_key: list[str] = typer.Option([], "--api-key", help="Accept `Authorization: Bearer KEY` (repeatable)."),
    queue: int = typer.Option(64, "--queue", help="Jobs that may wait; one more gets a 503 with Retry-After."),
    batch_window: float = typer.Option(50.0, "--batch-window", help="Milliseconds a worker waits for more jobs "
                                       "that can share its U-Net calls."),
    max_batch: int = typer.Option(8, "--max-batch", help="Images per batched run (1 turns batching off)."),
    max_batch_megapixels: float = typer.Option(0.25, "--max-batch-megapixels", help="And at most this many "
                                               "megapixels per batched run (its memory grows with them; 0.25 = one "
                                               "512x512 image: on the CPU SD 1.5 gains nothing from batching)."),
    workers: int = typer.Option(1, "--workers", help="Worker threads, each with its own copy of every model."),
    job_timeout: float = typer.Option(600.0, "--job-timeout", help="Seconds a job may take, waiting included."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="On SIGTERM: seconds running jobs may take."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", help="Largest request body (init images)."),
    max_prompt_chars: int = typer.Option(8192, "--max-prompt-chars", help="Longest prompt accepted."),
    lora_dir: list[Path] = typer.Option([], "--lora-dir", help="Where <lora:name:w> tags are looked up."),
    embedding: list[Path] = typer.Option([], "--embedding", help="Textual-inversion file to load (repeatable)."),
    controlnet: list[Path] = typer.Option([], "--controlnet", help="A ControlNet bundle requests may name in "
                                          "alwayson_scripts.controlnet (repeatable)."),
    backend: str = typer.Option("auto", "--backend", help="auto, tensorrt or onnxruntime."),
    engines: Path = typer.Option(Path("engines"), "--engines", help="Where `sdrt build` put the engines."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime threads per session."),
    ray: bool = typer.Option(False, "--ray", help="Run as a Ray Serve deployment (the `ray` extra)."),
    replicas: int = typer.Option(1, "--replicas", help="--ray: replicas, each loading the models once."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--ray: a running cluster (default: a "
                                              "local Ray instance)."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", help="--ray: CPUs each replica reserves."),
    replica_gpus: float = typer.Option(0.0, "--replica-gpus", help="--ray: GPUs each replica reserves (0.5: two "
                                       "per GPU)."),
):
    """Serve AUTOMATIC1111's HTTP API (/sdapi/v1) and sdrt's jobs API (/sdrt/v1) over the models."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingDependency("sdrt serve needs FastAPI and uvicorn: pip install 'sdrt[serve]'") from None
    from .serve.app import Access
    from .serve.models import LoadOptions, ModelSet
    from .serve.queue import Settings

    numbers = {"--port": (port, 0, 65535), "--queue": (queue, 0, 100_000), "--max-batch": (max_batch, 1, 64),
               "--workers": (workers, 1, 64), "--replicas": (replicas, 1, 1024),
               "--max-prompt-chars": (max_prompt_chars, 1, 1_000_000)}
    for flag, (value, lo, hi) in numbers.items():
        if not lo <= value <= hi:
            raise InvalidRequest(f"{flag} must be from {lo} to {hi}, got {value}")
    for flag, value in (("--batch-window", batch_window), ("--job-timeout", job_timeout),
                        ("--drain-timeout", drain_timeout), ("--max-body-mb", max_body_mb),
                        ("--max-batch-megapixels", max_batch_megapixels)):
        if not value >= 0:
            raise InvalidRequest(f"{flag} must be a number >= 0, got {value}")
    access = Access(users=_users(api_auth), keys=tuple(api_key), max_body_bytes=int(max_body_mb * 2**20),
                    max_prompt_chars=max_prompt_chars)
    settings = Settings(queue=queue, batch_window_s=batch_window / 1000, max_batch=max_batch, workers=workers,
                        job_timeout_s=job_timeout or None, max_batch_pixels=int(max_batch_megapixels * 2**20))
    models = ModelSet(list(model), LoadOptions(backend=backend, engines=engines, threads=threads,
                                               lora_dirs=tuple(lora_dir), embeddings=tuple(embedding),
                                               controlnets=tuple(controlnet)))
    echo = lambda m: typer.echo(m, err=True)  # noqa: E731
    if ray:
        from .serve.ray_serve import serve_on_ray
        serve_on_ray(models, settings, access, host, port, replicas, ray_address, replica_cpus, replica_gpus,
                     log=echo)
        return
    from .serve.run import serve_forever
    serve_forever(models, settings, access, host, port, drain_timeout, log=echo)


def _users(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    users = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user:
            raise InvalidRequest(f"--api-auth takes USER:PASS[,USER:PASS], got {item.strip()!r}")
        users.append((user, password))
    return tuple(users)
