"""`sdrt hypernetwork ...` and `sdrt controlnet ...`: what is added to a bundle, and a request's ControlNets from
the generation commands' options."""
from __future__ import annotations

from pathlib import Path

import typer

from .cli_base import _export_api, _fail, app, handle_errors

hypernetwork_app = typer.Typer(no_args_is_help=True, help="Hypernetworks (A1111 .pt files) baked into a bundle.")
app.add_typer(hypernetwork_app, name="hypernetwork")


@hypernetwork_app.command("add")
@handle_errors
def hypernetwork_add(
    bundle: Path = typer.Argument(..., help="A bundle folder (from `sdrt export`)."),
    files: list[Path] = typer.Argument(..., help="Hypernetwork .pt files; a file's stem is its <hypernet:NAME> tag."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read the .pt (a pickle: tensors only)."),
    stack: bool = typer.Option(False, "--stack", help="Bake the files as one stack, applied in their order (for "
                               "prompts with their tags in that order), not one variant each."),
):
    """Bake hypernetworks into an exported bundle's U-Net (variant graphs checked against torch)."""
    def log(message):
        typer.echo(message, err=True)

    if stack:
        added = [_export_api("add_stack")(bundle, files, allow_pickle, log)]
    else:
        add = _export_api("add_hypernetwork")
        added = [add(bundle, f, allow_pickle, log) for f in files]
    for name in added:
        tags = " ".join(f"<hypernet:{n}:1>" for n in name.split("+"))
        typer.echo(f"added hypernetwork {name!r} to {bundle}: use {tags} in a prompt")


@hypernetwork_app.command("remove")
@handle_errors
def hypernetwork_remove(bundle: Path = typer.Argument(...), name: str = typer.Argument(..., help="See `sdrt info`.")):
    """Take a hypernetwork out of a bundle (its variant graphs and weights)."""
    _export_api("remove_hypernetwork")(bundle, name, log=typer.echo)


controlnet_app = typer.Typer(no_args_is_help=True, help="ControlNet: the U-Net that takes its residuals.")
app.add_typer(controlnet_app, name="controlnet")


@controlnet_app.command("prepare")
@handle_errors
def controlnet_prepare(bundle: Path = typer.Argument(..., help="A bundle exported before sdrt had ControlNet.")):
    """Add the U-Net variant that takes ControlNet residuals to a bundle (exports since ControlNet have it)."""
    if _export_api("prepare_controlnet")(bundle, log=lambda m: typer.echo(m, err=True)):
        typer.echo(f"{bundle} takes ControlNets now: --controlnet CN_BUNDLE --control-image FILE")


# The generation commands' ControlNet options (sdrt.cli._SHARED): (name, type, typer default).
CONTROL_OPTIONS = [
    ("controlnet", list[Path], typer.Option([], "--controlnet", help="A ControlNet bundle (sdrt export of a "
                                            "ControlNet); repeatable, one per --control-image.")),
    ("control_image", list[Path], typer.Option([], "--control-image", help="Its control image (edges, depth, "
                                               "pose, ...), resized to the generation size.")),
    ("control_weight", list[float], typer.Option([], "--control-weight", help="Its weight (default 1; one value "
                                                 "for every net, or one per net).")),
    ("control_start", list[float], typer.Option([], "--control-start", help="Fraction of the steps where it "
                                                "starts acting (default 0).")),
    ("control_end", list[float], typer.Option([], "--control-end", help="... and stops (default 1).")),
    ("control_preprocess", list[str], typer.Option([], "--control-preprocess", help="none, canny, invert or depth "
                                                   "(the bundle's estimator): how the image becomes the map.")),
    ("control_mode", list[str], typer.Option([], "--control-mode", help="A1111's control mode: balanced (default), "
                                             "prompt (My prompt is more important) or controlnet (ControlNet is "
                                             "more important).")),
    ("canny_low", int, typer.Option(100, "--canny-low", help="canny: the lower threshold.")),
    ("canny_high", int, typer.Option(200, "--canny-high", help="canny: the upper threshold.")),
    ("guess_mode", bool, typer.Option(False, "--guess-mode", help="The nets see the positive prompt only, their "
                                      "residuals ramped (diffusers' guess mode).")),
]


def controls(s: dict) -> dict:
    """The generation options `controls` and `guess_mode` from the command's ControlNet options."""
    from .runtime.controlnet import Control, ControlNet

    nets, images = s["controlnet"], s["control_image"]
    if len(nets) != len(images):
        _fail(f"give one --control-image per --controlnet (got {len(nets)} nets and {len(images)} images)", 2)

    def per_net(values: list, default, what: str) -> list:
        if len(values) > 1 and len(values) != len(nets):
            _fail(f"give one {what} for every net, or one per --controlnet ({len(nets)}), not {len(values)}", 2)
        return [values[i] if len(values) > 1 else values[0] if values else default for i in range(len(nets))]

    weights = per_net(s["control_weight"], 1.0, "--control-weight")
    starts = per_net(s["control_start"], 0.0, "--control-start")
    ends = per_net(s["control_end"], 1.0, "--control-end")
    pre = per_net(s["control_preprocess"], "none", "--control-preprocess")
    modes = per_net(s["control_mode"], "balanced", "--control-mode")
    loaded: dict[Path, ControlNet] = {}
    out = []
    for net, image, w, a, e, p, mode in zip(nets, images, weights, starts, ends, pre, modes):
        if net not in loaded:
            loaded[net] = ControlNet.load(net, backend=s["backend"], engines=s["engines"])
        out.append(Control(loaded[net], image, w, a, e, None if p == "none" else p, s["canny_low"], s["canny_high"],
                           mode))
    return {"controls": out, "guess_mode": s["guess_mode"]}
