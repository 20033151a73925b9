"""Graph passes: rewrites of an exported ONNX graph into a faster one for a given backend.

Each pass is a function `(model, ctx) -> model` from an onnx ModelProto and a `PassContext` (the component,
its plain graph, its trace, the sizes it was checked at) to a ModelProto; a pass that does not apply to the
component returns the model as it is. The exporter (export/bundle.py) applies them in one visible list,
`CPU_GRAPH_PASSES`, to write each component's model.cpu.onnx:

- `cpu_graph.fused_attention`: the U-Net traced again with each attention one operator (MultiHeadAttention,
  or sdrt's own for small heads);
- `winograd.convolutions`: large 3x3 convolutions by Winograd's F(4x4, 3x3);
- `native_graph.group_norms`: GroupNorm (+ SiLU) as sdrt's operators in a small U-Net;
- `cpu_graph.shared_weights`: a retraced graph's weights pointed at the plain graph's model.onnx_data.

Two more run at other stages, on files, because the tools they wrap work on files: `int8.quantize_matmuls`
(ONNX Runtime's quantizer; the exporter, `--int8`, from the CPU graph) and `fp16.convert_file` (before TensorRT
parses a graph; export/build.py).

Imports: export/passes may use sdrt.runtime (graph names, the engine's threading rule); sdrt.runtime never
imports it.
"""
from .context import PassContext, Unsupported

__all__ = ["PassContext", "Unsupported"]
