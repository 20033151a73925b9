"""Typed errors. Each names the value, what was expected and what to do.

The CLI maps each class to one line on stderr and its exit code; the Python API raises them as they are.
"""
from __future__ import annotations


class SdrtError(Exception):
    """Base of every error sdrt raises on purpose."""

    exit_code = 1


class InvalidRequest(SdrtError, ValueError):
    """A generation or export parameter is out of range or of the wrong kind."""

    exit_code = 2


class UnknownSampler(InvalidRequest):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown sampler {name!r}; known samplers: {', '.join(known)}")
        self.name, self.known = name, known


class OutputNotWritable(InvalidRequest):
    pass


class BundleError(SdrtError):
    """A bundle on disk is missing, corrupt, or of another format."""

    exit_code = 3


class BundleNotFound(BundleError):
    pass


class BundleCorrupt(BundleError):
    pass


class UnsupportedBundleVersion(BundleError):
    pass


class SourceError(SdrtError):
    """An export source is not a usable Stable Diffusion model folder."""

    exit_code = 4


class NotAModelFolder(SourceError):
    pass


class PickleRefused(SourceError):
    pass


class ExportFailed(SdrtError):
    """Tracing or verification of a component failed; nothing was written."""

    exit_code = 5


class EngineError(SdrtError):
    """An engine refused its inputs or failed while running."""

    exit_code = 6


class NonFiniteOutput(EngineError):
    """A stage produced NaN or Inf: raised instead of returning a black image."""

    def __init__(self, stage: str, step: int | None = None):
        where = f"{stage} at step {step}" if step is not None else stage
        super().__init__(
            f"non-finite values (NaN/Inf) in the output of the {where}; the image was not written. "
            "Try fp32 engines, a lower guidance scale, or another sampler."
        )
        self.stage, self.step = stage, step


class MissingDependency(SdrtError):
    exit_code = 7


# -- the GPU path (TensorRT engines, CUDA) --------------------------------------------------------------------
class BuildFailed(SdrtError):
    """TensorRT could not build an engine; nothing was stored for it."""

    exit_code = 5


class EngineNotBuilt(EngineError):
    """No engine in the store for this bundle, GPU, TensorRT version and shape: `sdrt build` makes one."""


class StaleEngine(EngineNotBuilt):
    """An engine whose manifest names another GPU, TensorRT version or bundle, or whose plan hash is wrong."""


class DeviceError(EngineError):
    """CUDA or TensorRT failed while running (the message names the call and CUDA's error)."""


class DeviceOutOfMemory(DeviceError):
    """The GPU has too little free memory; the message gives free and total and what to reduce."""


# -- the server (sdrt serve) -----------------------------------------------------------------------------------
class ServiceError(SdrtError):
    """A request the server refuses for a reason of its own; `status` is the HTTP status it answers with."""

    status = 400


class NotFound(ServiceError):
    status = 404  # an unknown job id, or img2img without an init image (A1111's 404)


class ModelNotServed(ServiceError):
    status = 400


class QueueFull(ServiceError):
    status = 503

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class JobCancelled(ServiceError):
    status = 409  # cancelled by DELETE, a disconnect, or the server draining


class JobTimedOut(ServiceError):
    status = 504
