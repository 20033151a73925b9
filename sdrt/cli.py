"""The `sdrt` command: thin. It parses, calls the library, and maps errors to one line and an exit code."""
from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import cli_adapters, cli_serve  # noqa: F401  (cli_serve registers `sdrt serve`)
from .cli_base import UsageError, _export_api, _fail, app, handle_errors
from .progress import StepBar


@app.command()
@handle_errors
def export(
    src: Path = typer.Argument(..., help="A diffusers-format Stable Diffusion 1.x/2.x folder, or a single-file "
                                "checkpoint (model.safetensors in the original layout); or a ControlNet (a "
                                "ControlNetModel folder or a single file such as control_v11p_sd15_canny)."),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle folder to write."),
    height: Optional[int] = typer.Option(None, help="Default image height (default: the model's own)."),
    width: Optional[int] = typer.Option(None, help="Default image width (default: the model's own)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load .bin/.ckpt/.pt weights (weights_only)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    family: Optional[str] = typer.Option(None, "--family", help="Single-file checkpoints: sd1, sd2 (512, epsilon) "
                                         "or sd2-v (768, v-prediction); default: read from the weights."),
    cpu_graph: str = typer.Option("auto", "--cpu-graph", help="auto, always or never: add U-Net and VAE decoder "
                                  "graphs for ONNX Runtime on the CPU (fused attention, Winograd convolutions; auto: "
                                  "the U-Net's always, the VAE decoder's from 256x256 up)."),
    int8: bool = typer.Option(False, "--int8", help="Also write a U-Net with int8 MatMuls (opt-in at generation "
                              "with --int8)."),
    hypernetwork: list[Path] = typer.Option([], "--hypernetwork", help="An A1111 hypernetwork .pt to bake into a "
                                            "U-Net variant (repeatable; needs --allow-pickle: they are pickles)."),
):
    """Export a model (or a ControlNet) to an ONNX bundle, checking every graph against torch."""
    if _export_api("is_controlnet")(src, allow_pickle):
        cn = _export_api("export_controlnet")(src, out, height, width, allow_pickle, force, family,
                                              log=lambda m: typer.echo(m, err=True), cpu_graph_policy=cpu_graph)
        typer.echo(f"wrote {out} (ControlNet for {cn.base_family} models with {cn.text_width}-wide text, "
                   f"{len(cn.residuals)} residuals): use it with --controlnet {out}")
        return
    manifest = _export_api("export_bundle")(src, out, height, width, allow_pickle, force, family=family,
                                            log=lambda m: typer.echo(m, err=True), cpu_graph_policy=cpu_graph,
                                            int8=int8, hypernetworks=hypernetwork)
    typer.echo(f"wrote {out} ({manifest.default_width}x{manifest.default_height}, {manifest.prediction_type}, "
               f"model hash {manifest.model_hash})")


# Options every generation command takes, after its own arguments: (name, type, typer default).
_SHARED = [
    ("prompt", str, typer.Argument(..., help="What to draw.")),
    ("model", Optional[Path], typer.Option(None, "--model", "-m", help="The bundle folder (from `sdrt export`); "
                                           "default: the embedded demo model.")),
    ("out", Path, typer.Option(..., "--out", "-o", help="Output PNG; with --batch N, OUT-0.png ... OUT-(N-1).png.")),
    ("negative_prompt", str, typer.Option("", "--negative-prompt", "-n")),
    ("steps", int, typer.Option(20, "--steps")),
    ("guidance", float, typer.Option(7.5, "--guidance", help="Classifier-free guidance scale; <= 1 turns it off.")),
    ("seed", Optional[int], typer.Option(None, "--seed", help="Image i of a batch uses seed+i (random if omitted).")),
    ("sampler", str, typer.Option("euler", "--sampler", help="Name, A1111 label or diffusers class.")),
    ("height", Optional[int], typer.Option(None, "--height")),
    ("width", Optional[int], typer.Option(None, "--width")),
    ("batch", int, typer.Option(1, "--batch")),
    ("eta", Optional[float], typer.Option(None, "--eta", help="DDIM only: 0 deterministic (default) to 1.")),
    ("clip_skip", int, typer.Option(1, "--clip-skip", help="A1111's numbering: 1 = last layer, 2 = the one before.")),
    ("no_emphasis", bool, typer.Option(False, "--no-emphasis", help="Brackets are plain text, not (word:1.3).")),
    ("truncate", bool, typer.Option(False, "--truncate", help="Drop what passes 75 tokens (diffusers) instead of "
                                    "encoding the prompt in 75-token chunks (A1111).")),
    ("embedding", list[Path], typer.Option([], "--embedding", help="Textual-inversion file (repeatable); its "
                                           "trigger is the file name (A1111) or the token it holds (diffusers).")),
    ("allow_pickle", bool, typer.Option(False, "--allow-pickle", help="Allow .pt/.bin embeddings (pickles run code).")),
    ("lora", list[str], typer.Option([], "--lora", help="LoRA .safetensors as FILE or FILE:WEIGHT (repeatable).")),
    ("lora_dir", list[Path], typer.Option([], "--lora-dir", help="Where <lora:name:weight> prompt tags are found.")),
    ("hypernetwork", Optional[str], typer.Option(None, "--hypernetwork", help="One of the bundle's hypernetworks "
                                                 "as NAME or NAME:STRENGTH (as a <hypernet:NAME:STRENGTH> tag).")),
    ("backend", str, typer.Option("auto", "--backend", help="auto (TensorRT when engines for this GPU exist, "
                                  "else ONNX Runtime), tensorrt or onnxruntime.")),
    ("engines", Path, typer.Option(Path("engines"), "--engines", help="Where `sdrt build` put the engines.")),
    ("no_watermark", bool, typer.Option(False, "--no-watermark", help="Skip the invisible watermark (sdrt info).")),
    ("int8", bool, typer.Option(False, "--int8", help="The U-Net with int8 MatMuls (bundles exported with --int8; "
                                "ONNX Runtime on the CPU; no LoRA).")),
    *cli_adapters.CONTROL_OPTIONS,
]


def generation_command(fn):
    """Register fn(pipe, prompt, options, progress, **own) -> images as a command taking its own arguments
    and options (fn's signature after the first four) followed by _SHARED; it writes the PNGs."""
    own = list(inspect.signature(fn).parameters.values())[4:]
    shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t) for n, t, d in _SHARED]

    @functools.wraps(fn)
    def command(**kwargs):
        s = {name: kwargs.pop(name) for name, _, _ in _SHARED}
        return _generate(fn, s, kwargs)

    kind = inspect.Parameter.KEYWORD_ONLY
    command.__signature__ = inspect.Signature([p.replace(kind=kind) for p in own[:_arguments(own)]] + shared[:1]
                                              + [p.replace(kind=kind) for p in own[_arguments(own):]] + shared[1:])
    return app.command(fn.__name__.replace("_command", ""))(handle_errors(command))


def _arguments(params) -> int:
    """How many of a command's own parameters are positional arguments (they come before PROMPT)."""
    return sum(1 for p in params if isinstance(p.default, type(typer.Argument(...))))


def _generate(fn, s: dict, own: dict) -> None:
    from .runtime.images import output_paths, save_all
    from .runtime.pipeline import Pipeline
    from .runtime.samplers import make_sampler

    paths = output_paths(s["out"], s["batch"] if s["batch"] > 0 else 1)  # an unwritable --out fails first
    if s["out"].suffix.lower() != ".png":
        _fail(f"--out {str(s['out'])!r} must end in .png", 2)
    make_sampler(s["sampler"], {}, 1, s["eta"])  # so do an unknown sampler and an eta it can't take
    loras = [_lora_option(text) for text in s["lora"]]
    pipe = Pipeline.load(s["model"], backend=s["backend"], engines=s["engines"], int8=s["int8"])
    pipe.lora_dirs = list(s["lora_dir"])
    for path in s["embedding"]:
        typer.echo(f"embedding {pipe.load_embedding(path, allow_pickle=s['allow_pickle'])!r} from {path}")
    options = {k: s[k] for k in ("negative_prompt", "steps", "guidance", "seed", "sampler", "height", "width",
                                 "batch", "eta", "clip_skip", "truncate")}
    options |= {"emphasis": not s["no_emphasis"], "loras": loras, "watermark": False if s["no_watermark"] else None,
                "hypernetwork": s["hypernetwork"], **cli_adapters.controls(s)}
    bar = StepBar()
    try:
        images = fn(pipe, s["prompt"], options, bar, **own)
    finally:
        bar.close()
    save_all(images, paths)
    for path, image in zip(paths, images):
        typer.echo(f"{path}  ({image.info['parameters'].splitlines()[-1]})")


@generation_command
def generate(pipe, prompt, options, progress):
    """Generate images from a prompt."""
    return pipe.txt2img(prompt, progress=progress, **options)


@generation_command
def img2img_command(pipe, prompt, options, progress,
                    image: Path = typer.Argument(..., help="The image to rework."),
                    strength: float = typer.Option(0.75, "--strength", help="0-1: how much to change (1 = all)."),
                    resize: bool = typer.Option(False, "--resize", help="Scale the image to --width/--height (or "
                                                "to multiples of 8) instead of refusing it.")):
    """Rework an image: noise it to --strength, then denoise it under the prompt."""
    return pipe.img2img(image, prompt, strength=strength, resize=resize, progress=progress, **options)


@generation_command
def inpaint_command(pipe, prompt, options, progress,
                    image: Path = typer.Argument(..., help="The image."),
                    mask: Path = typer.Argument(..., help="White = repaint, black = keep (grayscale or RGBA)."),
                    strength: float = typer.Option(1.0, "--strength"),
                    mask_blur: int = typer.Option(4, "--mask-blur", help="Pixels of blur at the mask's edge."),
                    only_masked: bool = typer.Option(False, "--only-masked", help="Work on a padded crop around "
                                                     "the mask at full resolution, then paste it back."),
                    padding: int = typer.Option(32, "--padding", help="--only-masked: pixels around the mask."),
                    resize: bool = typer.Option(False, "--resize")):
    """Repaint the masked part of an image; the rest stays as it was."""
    return pipe.inpaint(image, mask, prompt, strength=strength, mask_blur=mask_blur, only_masked=only_masked,
                        padding=padding, resize=resize, progress=progress, **options)


@generation_command
def outpaint_command(pipe, prompt, options, progress,
                     image: Path = typer.Argument(..., help="The image to extend."),
                     left: int = typer.Option(0, "--left"), right: int = typer.Option(0, "--right"),
                     top: int = typer.Option(0, "--top"), bottom: int = typer.Option(0, "--bottom"),
                     fill: str = typer.Option("edge", "--fill", help="Pre-fill of the new area: edge or noise."),
                     mask_blur: int = typer.Option(4, "--mask-blur")):
    """Extend an image past its borders (multiples of 8 pixels); its pixels stay as they were."""
    return pipe.outpaint(image, prompt, left=left, right=right, top=top, bottom=bottom, fill=fill,
                         mask_blur=mask_blur, progress=progress, **options)


def _lora_option(text: str) -> tuple[Path, float]:
    """FILE or FILE:WEIGHT (the weight after the last colon, so Windows drive letters survive)."""
    path, _, weight = text.rpartition(":")
    try:
        return (Path(path), float(weight)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


@generation_command
def depth2img_command(pipe, prompt, options, progress,
                      image: Path = typer.Argument(..., help="The image whose depth layout to keep."),
                      depth: Optional[Path] = typer.Option(None, "--depth", help="Depth map (16-bit PNG, PNG or "
                                                           ".npy); estimated by the bundle's DPT if omitted."),
                      strength: float = typer.Option(0.8, "--strength"),
                      resize: bool = typer.Option(False, "--resize")):
    """Generate under the prompt while keeping an image's depth layout (SD 2 depth models)."""
    return pipe.depth2img(image, prompt, depth=depth, strength=strength, resize=resize, progress=progress, **options)


@app.command()
@handle_errors
def info(bundle: Path = typer.Argument(..., help="A bundle folder."),
         as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON.")):
    """Check a bundle's files against its manifest and describe it."""
    from .info import describe
    from .runtime.manifest import load_manifest

    m = load_manifest(bundle)
    typer.echo(json.dumps(m.to_json(), indent=2) if as_json else "\n".join(describe(bundle, m)))


@app.command("bench")
@handle_errors
def bench_command(
    bundle: Optional[Path] = typer.Argument(None, help="A bundle folder (default: the embedded demo model)."),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime or tensorrt (as Pipeline.load)."),
    sampler: str = typer.Option("euler", "--sampler", help="Name, A1111 label or diffusers class."),
    steps: int = typer.Option(20, "--steps"),
    height: Optional[int] = typer.Option(None, "--height", help="Default: the bundle's size."),
    width: Optional[int] = typer.Option(None, "--width"),
    batch: int = typer.Option(1, "--batch"),
    guidance: float = typer.Option(7.5, "--guidance", help="<= 1 turns classifier-free guidance off."),
    runs: int = typer.Option(5, "--runs", help="Timed runs: medians and p90s are over these."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: every core)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result to this JSON file."),
):
    """Time each stage (text encoder, U-Net step, sampler step, VAE decode, end to end) on this machine."""
    from .bench import bench, check_output, command_line, format_table, write_json

    if json_out is not None:
        check_output(json_out)  # an unwritable --json fails now, not after the runs
    result = bench(bundle, backend, sampler, steps, height, width, batch, runs, warmup, guidance, threads=threads,
                   command=command_line(), log=lambda line: typer.echo(line, err=True))
    typer.echo(format_table(result))
    if json_out is not None:
        write_json(result, json_out)
        typer.echo(f"wrote {json_out}")


@app.command()
@handle_errors
def build(
    bundle: Path = typer.Argument(..., help="A bundle folder (from `sdrt export`)."),
    size: list[int] = typer.Option([], "--size", help="Square image size to build for (repeatable); default: the "
                                   "bundle's own (512 for SD 1.x, 768 for SD 2.x v-prediction)."),
    height: Optional[int] = typer.Option(None, "--height", help="With --width: a non-square size."),
    width: Optional[int] = typer.Option(None, "--width"),
    batch: int = typer.Option(1, "--batch", help="Images per request (the U-Net engine runs twice that)."),
    precision: str = typer.Option("fp16", "--precision", help="fp16 or fp32."),
    engines: Path = typer.Option(Path("engines"), "--engines", help="The engine store folder."),
    workspace: Optional[float] = typer.Option(None, "--workspace", help="TensorRT workspace limit in GiB."),
    chunks: int = typer.Option(1, "--chunks", help="Longest prompt the engines take, in 77-token chunks."),
    hypernetwork: list[str] = typer.Option([], "--hypernetwork", help="Also build the U-Net variant of this "
                                           "hypernetwork of the bundle (repeatable; see `sdrt info`)."),
    controlnet: list[Path] = typer.Option([], "--controlnet", help="Also build the U-Net that takes ControlNet "
                                          "residuals and this ControlNet bundle's engines (repeatable)."),
):
    """Build TensorRT engines of a bundle for this GPU (needs an NVIDIA GPU, TensorRT and cuda-python)."""
    from .export.build import build_engines

    sizes = [(s, s) for s in size]
    if (height is None) != (width is None):
        _fail("give --height and --width together", 2)
    if height is not None:
        sizes.append((height, width))
    built = build_engines(bundle, sizes or None, batch, precision, engines, workspace,
                          log=lambda m: typer.echo(m, err=True), chunks=chunks, hypernetworks=hypernetwork,
                          controlnets=controlnet)
    for m in built:
        typer.echo(f"{m['key']}  ({m['precision']}, {m['plan']['bytes'] / 2**20:.0f} MiB)")


@app.command()
@handle_errors
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """What this machine can run: GPU, driver, CUDA, TensorRT, ONNX Runtime, and what to install."""
    from .doctor import doctor as run_doctor

    report, text = run_doctor()
    typer.echo(json.dumps(report, indent=2) if as_json else text)


def main(argv: list[str] | None = None) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except UsageError as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        code = 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted; nothing was written", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
