"""sdrt: a compiled inference runtime for Stable Diffusion.

    import sdrt
    pipe = sdrt.Pipeline.load("bundles/my-model")
    images = pipe.txt2img("a red circle on a blue background", steps=20, seed=1)
"""
__version__ = "0.1.0"

from .errors import SdrtError  # noqa: E402
from .runtime.controlnet import Control, ControlNet  # noqa: E402
from .runtime.pipeline import Pipeline  # noqa: E402

__all__ = ["Control", "ControlNet", "Pipeline", "SdrtError", "__version__"]
