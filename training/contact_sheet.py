"""A contact sheet of the embedded model: one row per prompt, one column per seed, labelled.

    python training/contact_sheet.py --out docs/embedded_contact_sheet.png [--bundle B] [--seeds 6]
        [--steps 20] [--guidance 7.5] [--sampler euler] [--prompt TEXT ...]

Rows marked "held out" use (color, shape, background) combinations that training never saw. Each cell
is the 64x64 image scaled up 2x (nearest neighbour, so pixels stay honest). Needs only the runtime.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402

DEFAULT_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow square on a purple background",
    "a small white triangle on a black background",
    "a green circle on a orange background",
    "a red triangle on a green background",  # held out
    "a blue square on a yellow background",  # held out
    "a small black circle on a red background",  # held out
    "a large purple triangle on a yellow background",  # held out
)
CELL, GAP, LABEL_W, HEADER = 128, 4, 330, 22
HELD = {" ".join(c) for c in world.HELD_OUT}


def is_held_out(prompt: str) -> bool:
    words = [w for w in prompt.split() if w not in ("a", "small", "large", "on", "background")]
    return " ".join(words) in HELD


def sheet(pipe, prompts, seeds: int, steps: int, guidance: float, sampler: str) -> Image.Image:
    w = LABEL_W + seeds * (CELL + GAP)
    h = HEADER + len(prompts) * (CELL + GAP)
    out = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), f"sdrt embedded model: {steps} steps, {sampler}, guidance {guidance}", fill="black")
    for s in range(seeds):
        draw.text((LABEL_W + s * (CELL + GAP) + 4, 4), f"seed {s}", fill="black")
    for row, prompt in enumerate(prompts):
        y = HEADER + row * (CELL + GAP)
        draw.text((4, y + CELL // 2 - 12), prompt, fill="black")
        if is_held_out(prompt):
            draw.text((4, y + CELL // 2 + 4), "(held out: never seen in training)", fill=(170, 0, 0))
        for s in range(seeds):
            image = pipe.txt2img(prompt, steps=steps, guidance=guidance, seed=s, sampler=sampler)[0]
            out.paste(image.resize((CELL, CELL), Image.NEAREST), (LABEL_W + s * (CELL + GAP), y))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Grid of prompts x seeds from a bundle (default: the embedded one).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--prompt", action="append", help="a row (repeatable; default: a fixed mix)")
    args = ap.parse_args(argv)
    import sdrt

    pipe = sdrt.Pipeline.load(args.bundle) if args.bundle else sdrt.Pipeline.load()
    image = sheet(pipe, args.prompt or DEFAULT_PROMPTS, args.seeds, args.steps, args.guidance, args.sampler)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
