"""What a graph pass is given besides the model: one component's export, as the exporter has it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class Unsupported(Exception):
    """A model a pass cannot rewrite exactly; the graph it would have written is left out (a bundle runs without)."""


@dataclass
class PassContext:
    component: str
    plain_graph: Path  # the component's exported graph (model.onnx), its weights in model.onnx_data beside it
    traced: object  # the component as traced (export.families.Traced): passes that retrace it use its module
    conv_sizes: dict  # each convolution's input size at the bundle's default size (winograd.recording_conv_sizes)
    winograd_rule: str = "auto"  # a key of winograd.RULES
    retraced: bool = False  # set by a pass that traced the module again (its weights are copies until shared)
    counts: dict[str, int] = field(default_factory=dict)  # what each pass rewrote, for the exporter's log line
