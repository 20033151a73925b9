"""The embedded demo model: a tiny Stable Diffusion (CLIP text encoder, AutoencoderKL, U-Net with
cross-attention) trained by sdrt itself on a synthetic world of one flat shape on a plain background,
64x64 ("a [small|large] {color} {shape} on a {color} background"; see training/world.py).

`MODEL` is the trained model in diffusers' layout (float16 safetensors; what training/train.py writes), and
`BUNDLE` its export by `sdrt.export.export_bundle(MODEL, ...)`: what `sdrt.Pipeline.load()` and
`sdrt generate` use when no bundle is named. tests/test_embedded.py re-exports MODEL and checks that it
gives BUNDLE's images, so the two cannot drift apart. Importing this module needs neither torch nor onnx.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "model"
BUNDLE = HERE / "bundle"
