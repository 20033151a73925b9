"""The README's ControlNet example: the embedded model with the canny ControlNet train_controlnet.py makes, by the
very CLI commands the README shows.

    python training/train_controlnet.py --model sdrt/embedded/model --out /tmp/embedded-canny
    python training/controlnet_example.py --controlnet /tmp/embedded-canny --bundle /tmp/canny-cn --out docs/controlnet

Exports the ControlNet folder (sdrt export, to --bundle), draws control images from the embedded world (shapes the prompt
does not name, where the model would not put its own), and generates each prompt without and with the ControlNet
(`--control-preprocess canny`, so the command takes the picture itself); writes controlnet.png, every input,
its canny map and both outputs side by side, titled.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402
from mode_examples import run  # noqa: E402

SEED = 3
CASES = [  # (control scene: colour, shape, background, size word; where; the prompt)
    (("white", "triangle", "black"), "large", (4, 20), "a green square on a yellow background"),
    (("red", "circle", "blue"), "small", (40, 6), "a purple square on an orange background"),
    (("green", "square", "yellow"), "small", (6, 38), "an orange circle on a white background"),
]


def control_scene(combo, size_word: str, where: tuple[int, int]) -> Image.Image:
    lo, hi = world.SIZE_RANGES[size_word]
    return Image.fromarray(world.render(world.Scene(*combo, size_word, (lo + hi) // 2, *where)))


def main(argv=None) -> None:
    from sdrt.runtime.preprocess import canny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--controlnet", type=Path, required=True, help="the ControlNet folder train_controlnet.py wrote")
    ap.add_argument("--bundle", type=Path, required=True, help="where to export it (a ControlNet bundle)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle
    run(["export", str(args.controlnet), "--out", str(bundle), "--height", "64", "--width", "64", "--force"])
    rows = []
    for k, (combo, size_word, where, prompt) in enumerate(CASES):
        control = args.out / f"control-{k}.png"
        control_scene(combo, size_word, where).save(control)
        canny(Image.open(control)).save(args.out / f"canny-{k}.png")
        plain, guided = args.out / f"plain-{k}.png", args.out / f"controlled-{k}.png"
        commands = [["generate", prompt, "--seed", str(SEED), "--no-watermark", "--out", str(plain)],
                    ["generate", prompt, "--seed", str(SEED), "--no-watermark", "--controlnet", str(bundle),
                     "--control-image", str(control), "--control-preprocess", "canny", "--out", str(guided)]]
        for argv_ in commands:
            run(argv_)
            print("sdrt " + shlex.join(argv_))
        rows.append((prompt, [control, args.out / f"canny-{k}.png", plain, guided]))
    sheet(rows).save(args.out / "controlnet.png", optimize=True)
    print(f"wrote {args.out / 'controlnet.png'}")


def sheet(rows, cell: int = 160) -> Image.Image:
    titles = ["control image", "its canny map", "the prompt alone", "with the ControlNet"]
    out = Image.new("RGB", (4 * (cell + 8), len(rows) * (cell + 44) + 20), "white")
    draw = ImageDraw.Draw(out)
    for i, t in enumerate(titles):
        draw.text((i * (cell + 8) + 2, 4), t, fill="black")
    for r, (prompt, files) in enumerate(rows):
        y = 20 + r * (cell + 44)
        draw.text((2, y + 2), f'"{prompt}"', fill="black")
        for i, f in enumerate(files):
            out.paste(Image.open(f).convert("RGB").resize((cell, cell), Image.NEAREST), (i * (cell + 8), y + 18))
    return out


if __name__ == "__main__":
    main()
