"""The README's image-mode examples, made with the embedded model by the very CLI commands the README shows.

    python training/mode_examples.py --out docs/modes [--model BUNDLE]

Writes source.png (txt2img), img2img.png, mask.png + inpaint.png, outpaint.png and, when the bundle (or
`--depth-model`) is a depth model, depth.png + depth2img.png; then modes.png, all of them side by side with
their commands. Needs only the runtime.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SOURCE_PROMPT, SEED = "a red circle on a blue background", 3


def shape_mask(image: Path, grow: int = 6) -> Image.Image:
    """White over the shape's bounding box (pixels far from the border's median colour), grown by `grow`."""
    rgb = np.asarray(Image.open(image).convert("RGB"), np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    far = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1) > 60
    ys, xs = np.nonzero(far)
    mask = np.zeros(far.shape, np.uint8)
    if len(ys):
        mask[max(0, ys.min() - grow):ys.max() + grow + 1, max(0, xs.min() - grow):xs.max() + grow + 1] = 255
    return Image.fromarray(mask)


def commands(out: Path, model: list[str], depth_model: list[str] | None) -> list[tuple[str, list[str], str]]:
    """(title, argv, output file) in order; later ones read earlier outputs."""
    src, seed = str(out / "source.png"), ["--seed", str(SEED)]
    rows = [
        ("txt2img", ["generate", SOURCE_PROMPT, *model, *seed, "--out", src], src),
        ("img2img, strength 0.7", ["img2img", src, "a yellow circle on a purple background", "--strength", "0.7",
                                   *model, *seed, "--out", str(out / "img2img.png")], str(out / "img2img.png")),
        ("inpaint (white = repaint)", ["inpaint", src, str(out / "mask.png"), "a yellow square on a blue background",
                                       *model, *seed, "--out", str(out / "inpaint.png")], str(out / "inpaint.png")),
        ("outpaint 32 px left and right", ["outpaint", src, SOURCE_PROMPT, "--left", "32", "--right", "32", *model,
                                           *seed, "--out", str(out / "outpaint.png")], str(out / "outpaint.png")),
    ]
    if depth_model is not None:
        rows.append(("depth2img (depth map given)",
                     ["depth2img", src, "a green square on a yellow background", "--depth", str(out / "depth.png"),
                      "--strength", "1.0", *depth_model, *seed, "--out", str(out / "depth2img.png")],
                     str(out / "depth2img.png")))
    return rows


def depth_map(out: Path) -> Path:
    """A 16-bit depth map: a square, nearer (brighter) than the ground, off to the lower right."""
    depth = np.full((64, 64), 8000, np.uint16)
    depth[30:58, 28:56] = 60000
    path = out / "depth.png"
    Image.fromarray(depth).save(path)
    return path


def run(argv: list[str]) -> None:
    from sdrt.cli import main

    try:
        main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"`sdrt {shlex.join(argv)}` exited {e.code}") from None


def strip(rows, out: Path, cell: int = 192) -> Image.Image:
    """Every output (and the mask / depth inputs) scaled 3x, nearest neighbour, titled by its command."""
    tiles = [("txt2img", out / "source.png")] + [(t, Path(f)) for t, _, f in rows[1:]]
    extra = {"inpaint (white = repaint)": out / "mask.png", "depth2img (depth map given)": out / "depth.png"}
    width = sum((cell * Image.open(f).width // 64 + 8) * (1 + (t in extra)) for t, f in tiles)
    sheet = Image.new("RGB", (width, cell + 40), "white")
    draw, x = ImageDraw.Draw(sheet), 0
    for title, f in tiles:
        for name, path in ([("input: " + ("mask" if "inpaint" in title else "depth"), extra[title])]
                           if title in extra else []) + [(title, f)]:
            image = Image.open(path)
            if image.mode not in ("RGB", "L"):
                image = Image.fromarray((np.asarray(image, np.float32) / 257).astype(np.uint8))
            image = image.convert("RGB").resize((cell * image.width // 64, cell), Image.NEAREST)
            sheet.paste(image, (x, 30))
            draw.text((x + 2, 8), name, fill="black")
            x += image.width + 8
    return sheet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=None, help="bundle (default: the embedded one)")
    ap.add_argument("--depth-model", default=None, help="a depth (5-channel) bundle for the depth2img example")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = ["--model", args.model] if args.model else []
    depth = ["--model", args.depth_model] if args.depth_model else None
    rows = commands(args.out, model, depth)
    for i, (title, argv_, _) in enumerate(rows):
        if title.startswith("inpaint"):
            shape_mask(args.out / "source.png").save(args.out / "mask.png")
        if title.startswith("depth2img"):
            depth_map(args.out)
        run(argv_)
        print("sdrt " + shlex.join(argv_))
    strip(rows, args.out).save(args.out / "modes.png", optimize=True)
    print(f"wrote {args.out / 'modes.png'}")


if __name__ == "__main__":
    main()
