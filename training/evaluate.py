"""Judge pictures of the synthetic world (training/world.py) by their pixels alone: no learned model.

    python training/evaluate.py --self            # the evaluator on the generator's own images
    python training/evaluate.py [--bundle B]      # the embedded model on the HELD_OUT combos

Reading an image:
- background: the per-channel median of a 2-pixel border ring (shapes keep a 3-pixel margin), named by the
  nearest palette colour (Euclidean RGB distance);
- shape colour: the median of the pixels that differ most from the background, named the same way;
- shape pixels: those closer to the shape colour than to the background along the line between the two
  (50 % coverage, so anti-aliased edges split fairly), largest 4-connected region only;
- shape class: nearest prototype over three geometric features of that region inside its bounding box:
  fill ratio (square 1, circle pi/4, triangle 1/2), taper (bottom-quarter width minus top-quarter width:
  triangle ~0.75, others ~0) and corner fill (the four corner patches: square ~1, others low);
- size: the bounding box's mean side in pixels; "small" below 32, "large" from 32 (the gap between the
  world's two ranges is 27..37).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402

PALETTE = np.asarray(list(world.COLORS.values()), np.float32)
PALETTE_NAMES = list(world.COLORS)
# (fill, taper, corners) of ideal shapes; measured on the generator's images, rounded.
PROTOTYPES = {"square": (1.0, 0.0, 1.0), "circle": (0.79, 0.0, 0.13), "triangle": (0.515, 0.73, 0.38)}
SIZE_SPLIT = 32  # pixels: smaller is "small"
MIN_CONTRAST = 40.0  # RGB distance below which a pixel is background, whatever the shape colour
MIN_AREA = 12  # pixels: a smaller region is noise, not a shape


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None  # None: no shape found
    shape: str | None
    size: float  # bounding-box side in pixels (0 without a shape)

    @property
    def size_word(self) -> str | None:
        return None if self.shape is None else ("small" if self.size < SIZE_SPLIT else "large")


def nearest_color(rgb: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (flood fill; images are 64x64)."""
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start], queue, count = label, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if count > best_size:
            best, best_size = label, count
    return labels == best if best else np.zeros_like(mask)


def shape_features(region: np.ndarray) -> tuple[float, float, float, float]:
    """(fill, taper, corners, side) of a region, measured inside its bounding box."""
    ys, xs = np.nonzero(region)
    box = region[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    h, w = box.shape
    fill = float(box.mean())
    q = max(1, round(h / 4))
    taper = float(box[-q:].mean() - box[:q].mean())  # mean row coverage, bottom quarter minus top quarter
    ch, cw = max(1, round(h / 5)), max(1, round(w / 5))
    corners = float(np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(),
                             box[-ch:, -cw:].mean()]))
    return fill, taper, corners, (h + w) / 2


def classify_shape(fill: float, taper: float, corners: float) -> str:
    feats = np.asarray((fill, taper, corners))
    return min(PROTOTYPES, key=lambda k: float(((feats - np.asarray(PROTOTYPES[k])) ** 2).sum()))


def read(image) -> Reading:
    """Read an image (PIL or (64, 64, 3) uint8 array) back into the world's terms."""
    img = np.asarray(image, np.float32)[..., :3]
    ring = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                           img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(axis=-1))
    far = dist > max(MIN_CONTRAST, 0.6 * float(np.percentile(dist, 99)))  # the shape's core, not its edges
    if far.sum() < MIN_AREA:
        return Reading(nearest_color(bg), None, None, 0.0)
    fg = np.median(img[far], axis=0)
    axis = fg - bg
    t = ((img - bg) @ axis) / float(axis @ axis)  # 0 at the background colour, 1 at the shape colour
    region = largest_region(t > 0.5)
    if region.sum() < MIN_AREA:
        return Reading(nearest_color(bg), None, None, 0.0)
    fill, taper, corners, side = shape_features(region)
    return Reading(nearest_color(bg), nearest_color(fg), classify_shape(fill, taper, corners), side)


def score(reading: Reading, scene: world.Scene) -> dict[str, bool]:
    """Which parts of the caption the picture obeys. `size` only counts when the caption has a size word."""
    out = {"background": reading.background == scene.background, "color": reading.color == scene.color,
           "shape": reading.shape == scene.shape}
    if scene.size_word:
        out["size"] = reading.size_word == scene.size_word
    return out


def tally(results: list[dict[str, bool]]) -> dict[str, float]:
    keys = ("background", "color", "shape", "size")
    out = {k: float(np.mean([r[k] for r in results if k in r])) for k in keys if any(k in r for r in results)}
    out["all"] = float(np.mean([all(r.values()) for r in results]))
    out["n"] = len(results)
    return out


def self_check(n: int = 2000, seed: int = 1234) -> dict[str, float]:
    """The evaluator on the generator's ground-truth images of every combo (held-out ones included)."""
    scenes = world.sample_scenes(n, seed, combos=world.all_combos())
    return tally([score(read(world.render(s)), s) for s in scenes])


def heldout_scenes(seeds: int, size_words=world.SIZE_WORDS) -> list[tuple[world.Scene, int]]:
    """(scene, seed) for every HELD_OUT combo x size word x seed. Only the caption and size word matter."""
    return [(world.Scene(*combo, word, 0, 0, 0), seed)
            for combo in world.HELD_OUT for word in size_words for seed in range(seeds)]


def adherence(pipe, cases: list[tuple[world.Scene, int]], steps: int = 20, guidance: float = 7.5,
              sampler: str = "euler") -> tuple[dict, list]:
    """Generate each case's caption with its seed and score the picture; returns (tally, per-case rows)."""
    rows = []
    for scene, seed in cases:
        image = pipe.txt2img(scene.caption, steps=steps, guidance=guidance, seed=seed, sampler=sampler)[0]
        reading = read(image)
        rows.append({"caption": scene.caption, "size_word": scene.size_word, "seed": seed,
                     "read": reading.__dict__, "ok": score(reading, scene)})
    return tally([r["ok"] for r in rows]), rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self", dest="self_check", action="store_true", help="score the generator's own images")
    ap.add_argument("--bundle", default=None, help="bundle to judge (default: the embedded one)")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--int8", action="store_true", help="the bundle's opt-in int8 U-Net (sdrt export --int8)")
    ap.add_argument("--json", default=None, help="write the figures (and every reading) to this file")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if args.self_check:
        result, rows = self_check(), []
    else:
        import sdrt

        pipe = sdrt.Pipeline.load(args.bundle, int8=args.int8)
        result, rows = adherence(pipe, heldout_scenes(args.seeds), args.steps, args.guidance, args.sampler)
        by_word = {str(w): tally([r["ok"] for r in rows if r["size_word"] == w]) for w in world.SIZE_WORDS}
        result = {"overall": result, "by_size_word": by_word}
    print(json.dumps(result, indent=2))
    print(f"({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"result": result, "args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
