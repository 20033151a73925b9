"""The U-Net's ONNX Runtime CPU graph: every attention one com.microsoft MultiHeadAttention node, and the
large 3x3 convolutions computed by Winograd's F(4x4, 3x3) (export/passes/winograd.py).

Why: the plain graph computes attention as MatMul, Softmax, MatMul, so at 512x512 each self-attention over
4096 latent tokens writes and rereads a (2, 8, 4096, 4096) float32 score tensor (1 GiB). ONNX Runtime's
MultiHeadAttention CPU kernel (separate Q, K, V inputs) works through it in cache-sized blocks instead, as
PyTorch's scaled_dot_product_attention does. TensorRT cannot parse com.microsoft operators, so the plain graph
stays the bundle's graph (TensorRT and the CUDA provider build from it) and this one is an extra file,
`unet/model.cpu.onnx`, that only the ONNX Runtime CPU backend opens.

Small attentions (head size up to NATIVE_MAX_HEAD_SIZE, a modest score matrix) are written as sdrt's own
operator, ai.sdrt Attention, with an ONNX function body that is the com.microsoft operator: ONNX Runtime runs
sdrt's kernel where runtime/engines/native_ops.py could build it, and the function where it could not. ONNX
Runtime's kernel spends most of its time around the thin products of such heads (benchmarks/NOTES.md, section 10).
In a U-Net that ONNX Runtime runs on one thread per call (a small model), torch's group_norm patterns become
sdrt's GroupNorm and GroupNorm+SiLU operators the same way (export/passes/native_graph.py).

How: the U-Net is traced a second time with an attention processor whose core exports as that operator
(the projections stay ordinary layers). The new graph holds no weights of its own: each initializer is
matched by its bytes to the plain graph's and renamed and pointed into its model.onnx_data, so the bundle
grows by the graph's structure only and LoRA overrides (by initializer name, lora_map.json) reach both graphs.
It is checked against torch like every exported graph. (onnxruntime.transformers' fusion was tried first: it
packs self-attention's Q, K, V weights into a new tensor for its `Attention` operator, which breaks both.)

Fused attention is at least as fast at every size measured, so "auto" writes the U-Net's CPU graph for every
bundle (the embedded model's 8x8 latents, 1 thread, paired runs: 0.89x the plain graph's time at batch 1,
0.92x at batch 2; 32x32 latents 0.8x; benchmarks/NOTES.md, sections 1 and 9). The VAE decoder's CPU graph
holds only Winograd convolutions, which "auto" takes from 32x32 feature maps, so it is written from
`AUTO_MIN_TOKENS` latent pixels up. Which convolutions Winograd takes is decided by their feature-map size at
the bundle's default size, recorded while the export checks the graph against torch at that size.
"""
from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

from ...runtime import names
from .. import trace
from . import native_graph
from .context import PassContext, Unsupported

POLICIES = ("auto", "always", "never")  # whether the export writes this graph
AUTO_MIN_TOKENS = 1024  # latent pixels (H/8 * W/8) at the default size from which "auto" writes the VAE's graph
MAX_UNMATCHED_BYTES = 1 << 16  # the new graph may add small constants, never a copy of a weight
# sdrt's own attention kernel (runtime/engines/native/attention.h) takes an attention whose head size and score
# matrix (queries x keys, at the bundle's default size) are at most these; ONNX Runtime's is faster on larger ones
# (1 thread: head size 10 at 1024 x 77 0.39x its time, 20 at 256 x 256 1.06x, 20 at 1024 x 1024 1.3x;
# benchmarks/NOTES.md, section 10).
NATIVE_MAX_HEAD_SIZE = 20
NATIVE_MAX_SCORES = 1 << 17


def wanted(policy: str, component: str, height: int, width: int, scale: int = 8) -> bool:
    """Whether the export writes `component`'s CPU graph (the U-Net's and the VAE decoder's exist)."""
    if component not in (names.UNET, names.VAE_DECODER) or policy == "never":
        return False
    large = (height // scale) * (width // scale) >= AUTO_MIN_TOKENS
    return policy == "always" or component == names.UNET or large


def _processor():
    import torch

    class MultiHeadAttention(torch.autograd.Function):
        """softmax(q k^T * scale) v over `heads` heads; (B, S, D) q and (B, L, D) k, v -> (B, S, D)."""

        @staticmethod
        def forward(ctx, q, k, v, heads: int, scale: float, native: bool):
            b, s, d = q.shape
            split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # (B, heads, S, D/heads)
            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
            return out.transpose(1, 2).reshape(b, s, d)

        @staticmethod
        def symbolic(g, q, k, v, heads: int, scale: float, native: bool):
            op = f"{native_graph.DOMAIN}::Attention" if native else "com.microsoft::MultiHeadAttention"
            out = g.op(op, q, k, v, num_heads_i=heads, scale_f=scale)
            out.setType(q.type())  # same shape and dtype as q; tells torch's shape inference
            return out

    class FusedAttention:
        """diffusers' plain attention (Transformer2DModel's self and cross attention) with its core as one op."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            unusual = [n for n in ("spatial_norm", "group_norm", "norm_cross", "norm_q", "norm_k")
                       if getattr(attn, n, None) is not None]
            if unusual or attention_mask is not None or hidden_states.ndim != 3 or attn.residual_connection:
                raise Unsupported(f"attention with {unusual or 'a mask, 4-d input or residual'}")
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
            # Python ints, decided at trace time: under the tracer a size is a traced value, which the
            # symbolic function would receive as a graph node (always truthy).
            head, queries, keys = int(q.shape[-1]) // attn.heads, int(q.shape[1]), int(k.shape[1])
            native = bool(head <= NATIVE_MAX_HEAD_SIZE and queries * keys <= NATIVE_MAX_SCORES)
            out = MultiHeadAttention.apply(q, k, v, attn.heads, float(attn.scale), native)
            out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
            return out / attn.rescale_output_factor

    return FusedAttention()


def _trace(module, inputs, in_names, out_names, axes, scratch: Path):
    """The U-Net with the fused processor, as an in-memory ModelProto with its weights."""
    import onnx
    import torch

    unet = module.m
    saved = unet.attn_processors
    unet.set_attn_processor(_processor())
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = scratch / names.MODEL_FILE
            torch.onnx.export(module, inputs, str(raw), input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=trace.OPSET, do_constant_folding=True,
                              dynamo=False)  # custom domains get opset version 1
        model = onnx.load(str(raw))
        native_graph.add_functions(model)  # for the small attentions traced as sdrt's operator
        return model
    finally:
        unet.set_attn_processor(saved)


def _plain_weights(plain_graph: Path) -> dict[str, tuple[str, list]]:
    """sha1 of each external initializer's bytes -> (its name, its external_data entries)."""
    import onnx

    model = onnx.load(str(plain_graph), load_external_data=False)
    out = {}
    with open(plain_graph.parent / names.EXTERNAL_DATA_FILE, "rb") as data:
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            where = {e.key: e.value for e in t.external_data}
            data.seek(int(where.get("offset", 0)))
            digest = hashlib.sha1(data.read(int(where["length"]))).hexdigest()
            out.setdefault(digest, (t.name, list(t.external_data)))
    return out


def _rename(model, mapping: dict[str, str]) -> None:
    for t in model.graph.initializer:
        t.name = mapping.get(t.name, t.name)
    for v in model.graph.value_info:
        v.name = mapping.get(v.name, v.name)
    for node in model.graph.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        node.output[:] = [mapping.get(o, o) for o in node.output]


def _share_weights(model, plain: dict) -> None:
    """Point model's initializers at the plain graph's bytes, renamed to the plain graph's names."""
    import onnx
    from onnx import numpy_helper

    plain_names = {name for name, _ in plain.values()}
    # The two traces number their tensors independently: first move this graph's names out of the way.
    ours = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    _rename(model, {n: f"cpu/{n}" for n in ours & plain_names})
    taken, renames = set(), {}
    for t in model.graph.initializer:
        data = t.raw_data or numpy_helper.to_array(t).tobytes()
        match = plain.get(hashlib.sha1(data).hexdigest())
        if match is None:
            if len(data) > MAX_UNMATCHED_BYTES:
                raise Unsupported(f"weight {t.name!r} ({len(data)} bytes) has no copy in the plain graph")
            continue
        name, entries = match
        t.ClearField("raw_data")
        del t.float_data[:], t.int64_data[:], t.int32_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.extend(entries)
        if name not in taken:  # equal bytes under two names (zero biases): the second keeps its own name
            taken.add(name)
            renames[t.name] = name
    _rename(model, renames)


def fused_attention(model, ctx: PassContext):
    """The pass: the U-Net traced again with each attention one operator (other components pass through).
    `model` is replaced: the new trace is the rewrite; its weights are copies until `shared_weights`."""
    if ctx.component not in names.UNET_SHAPED:  # the models with attention
        return model
    t = ctx.traced
    with tempfile.TemporaryDirectory(dir=ctx.plain_graph.parent.parent) as scratch:
        model = _trace(t.module, t.inputs, t.input_names, t.output_names, t.dynamic_axes, Path(scratch))
    ctx.retraced = True
    ctx.counts["attention"] = sum(1 for n in model.graph.node if n.op_type in ("MultiHeadAttention", "Attention"))
    ctx.counts["native attention"] = sum(1 for n in model.graph.node
                                         if n.domain == native_graph.DOMAIN and n.op_type == "Attention")
    return model


def shared_weights(model, ctx: PassContext):
    """The pass: a retraced model's initializers pointed at the plain graph's model.onnx_data (no copies)."""
    if ctx.retraced:
        _share_weights(model, _plain_weights(ctx.plain_graph))
    return model
