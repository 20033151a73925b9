"""The U-Net that takes a ControlNet's residuals, made from the U-Net's own graph: one Add per skip connection and
one after the mid block, where diffusers' UNet2DConditionModel adds `down_block_additional_residuals` and
`mid_block_additional_residual`.

Where they go: diffusers keeps the down path's outputs (`down_block_res_samples`, 12 for SD 1.x/2.x) and every
up-block ResNet reads one through `torch.cat([hidden_states, res_hidden_states], dim=1)`. In the traced graph
those are the Concat nodes directly in an up block's scope (`/up_blocks.K/Concat`, `/up_blocks.K/Concat_1`, ...;
the nested ones build shapes), in the up path's order, reading the skips last-first. So down residual i is added
to the second input of skip concat N-1-i, and the mid residual to the first input of the first one (the mid
block's output, which the first up block reads first). Only those reads change: the same tensors feed the next
layer of the down path, which in diffusers does not see the residual either.

A graph edit, not a second trace: the weights stay the U-Net's (no copy; LoRA reaches them by the same names),
the CPU graph (fused attention, Winograd, sdrt's operators) takes the same edit, and bundles exported before
ControlNet existed get it without their torch model (`sdrt controlnet prepare`). The exporter checks the result
against diffusers' U-Net with residuals (export/controlnet_unet.py).
"""
from __future__ import annotations

import re

_SKIP_CONCAT = re.compile(r"(^|/)up_blocks\.\d+/Concat(_\d+)?$")


def skip_concats(model) -> list:
    """The up path's skip-connection Concat nodes, in the graph's (execution) order."""
    return [n for n in model.graph.node if n.op_type == "Concat" and _SKIP_CONCAT.search(n.name)]


def add_residual_inputs(model, layout: list[dict]) -> None:
    """Edit `model` (the U-Net's ONNX graph) in place. layout: {"name", "channels", "level"} of the down residuals
    0..N-1, then of the mid residual; level L: the latent size halved L times (export/controlnet_unet.py).
    Raises ValueError when the graph's skips do not match the layout (a U-Net traced some other way)."""
    from onnx import TensorProto, helper

    concats, down = skip_concats(model), layout[:-1]
    if len(concats) != len(down):
        raise ValueError(f"the graph has {len(concats)} skip connections where its config implies {len(down)}")
    skips = [concats[len(down) - 1 - i].input[1] for i in range(len(down))]  # skip i, as diffusers numbers them
    if len(set(skips)) != len(skips):
        raise ValueError("two skip connections read the same tensor")
    taken = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    if any(r["name"] in taken for r in layout):
        raise ValueError("the graph already has residual inputs")
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]  # the sample's batch dim (named or fixed)
    batch_dim = batch.dim_param or batch.dim_value or "batch"
    edits = []  # (concat node, its input index, residual input name)
    for i, r in enumerate(down):
        edits.append((concats[len(down) - 1 - i], 1, r["name"]))
    edits.append((concats[0], 0, layout[-1]["name"]))
    for r in layout:
        model.graph.input.append(helper.make_tensor_value_info(r["name"], TensorProto.FLOAT, [
            batch_dim, r["channels"], f"residual_height_{r['level']}", f"residual_width_{r['level']}"]))
    nodes = list(model.graph.node)
    position = {id(n): k for k, n in enumerate(nodes)}
    inserts: dict[int, list] = {}
    for concat, index, name in edits:
        out = f"{name}/sum"
        inserts.setdefault(position[id(concat)], []).append(
            helper.make_node("Add", [concat.input[index], name], [out], name=f"/controlnet/{name}/Add"))
        concat.input[index] = out
    del model.graph.node[:]
    for k, node in enumerate(nodes):
        model.graph.node.extend(inserts.get(k, []))  # just before the concat that reads the sum
        model.graph.node.append(node)
