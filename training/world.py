"""The synthetic world the embedded model is trained on: one flat shape on a plain background, 64x64.

Captions follow one grammar, every part of which the picture obeys:

    a [small|large] {color} {shape} on a {color} background

The shape colour differs from the background's; the size word is optional and, when present, confines the
shape's size (its bounding box side, in pixels) to SIZE_RANGES[word]; without it the size is drawn from the
whole range. Position varies at random. Shapes are axis-aligned: a circle of diameter `size`, a square of
side `size`, an upright isosceles triangle of base and height `size`, so every shape's bounding box is a
size x size square and the evaluator can tell them apart by geometry alone.

HELD_OUT lists (color, shape, background) combinations that training never sees, to measure whether the
model composes words it learnt separately. Everything is drawn from numpy generators with explicit seeds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down: anti-aliased edges, as a photo would have

COLORS = {  # far apart in RGB so that "which colour is it" has one answer
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 220, 40),
    "orange": (250, 122, 10), "purple": (135, 45, 175), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZE_WORDS = (None, "small", "large")
# A gap between "small" and "large" so the evaluator's split (at the gap's middle) is never a coin toss.
SIZE_RANGES = {"small": (16, 26), "large": (38, 52), None: (16, 52)}
MARGIN = 3  # pixels between the shape and the image edge, so the border is pure background

# Never used in training. Every colour appears here as a shape colour and as a background, every shape at
# least three times. ("a red circle on a blue background", the README's example, is deliberately not here.)
HELD_OUT = (
    ("red", "triangle", "green"), ("green", "circle", "purple"), ("blue", "square", "yellow"),
    ("yellow", "triangle", "black"), ("orange", "circle", "white"), ("purple", "square", "orange"),
    ("white", "triangle", "blue"), ("black", "circle", "red"), ("green", "square", "black"),
    ("purple", "triangle", "yellow"),
)


@dataclass(frozen=True)
class Scene:
    color: str  # the shape's
    shape: str
    background: str
    size_word: str | None
    size: int  # bounding-box side in pixels
    x: int  # top-left corner of the bounding box
    y: int

    @property
    def caption(self) -> str:
        size = f"{self.size_word} " if self.size_word else ""
        return f"a {size}{self.color} {self.shape} on a {self.background} background"

    @property
    def combo(self) -> tuple[str, str, str]:
        return self.color, self.shape, self.background


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if c != b]


def training_combos() -> list[tuple[str, str, str]]:
    held = set(HELD_OUT)
    return [combo for combo in all_combos() if combo not in held]


def place(combo: tuple[str, str, str], size_word: str | None, rng: np.random.Generator) -> Scene:
    """A scene for `combo` with the size word's size range, at a random size and position."""
    lo, hi = SIZE_RANGES[size_word]
    size = int(rng.integers(lo, hi + 1))
    x, y = (int(v) for v in rng.integers(MARGIN, SIZE - MARGIN - size + 1, size=2))
    return Scene(*combo, size_word, size, x, y)


def sample_scenes(n: int, seed: int, combos: list | None = None) -> list[Scene]:
    """n scenes, combos drawn uniformly from `combos` (default: the training combos), size word uniformly."""
    rng = np.random.default_rng(seed)
    combos = training_combos() if combos is None else combos
    picks = rng.integers(0, len(combos), size=n)
    words = rng.integers(0, len(SIZE_WORDS), size=n)
    return [place(combos[i], SIZE_WORDS[w], rng) for i, w in zip(picks, words)]


@functools.lru_cache(maxsize=4)
def _centres(side: int, scale: int) -> np.ndarray:
    return (np.arange(side * scale, dtype=np.float64) + 0.5) / scale


def shape_mask(scene: Scene, side: int = SIZE, scale: int = 1) -> np.ndarray:
    """Boolean (side*scale, side*scale) mask of the shape, sampled at pixel centres."""
    centres = _centres(side, scale)  # pixel centres in image-pixel units
    u = centres[None, :] - scene.x  # 0..size across the bounding box
    v = centres[:, None] - scene.y
    s = float(scene.size)
    inside = (u >= 0) & (u < s) & (v >= 0) & (v < s)
    if scene.shape == "square":
        return inside
    if scene.shape == "circle":
        r = s / 2
        return (u - r) ** 2 + (v - r) ** 2 < r * r
    # triangle: apex at the top centre, base along the bottom edge; half-width grows linearly with v
    return inside & (np.abs(u - s / 2) <= v / 2)


def render(scene: Scene) -> np.ndarray:
    """(64, 64, 3) uint8 image of the scene."""
    fine = shape_mask(scene, SIZE, SUPERSAMPLE).astype(np.float32)
    cover = fine.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))[..., None]  # 0..1 per pixel
    fg = np.asarray(COLORS[scene.color], np.float32)
    bg = np.asarray(COLORS[scene.background], np.float32)
    return np.rint(bg + cover * (fg - bg)).astype(np.uint8)


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """(N, 64, 64, 3) uint8."""
    return np.stack([render(s) for s in scenes])


if __name__ == "__main__":  # python training/world.py OUT.png: a strip of 8 training scenes
    import sys

    from PIL import Image

    scenes = sample_scenes(8, seed=0)
    Image.fromarray(np.concatenate(render_batch(scenes), axis=1)).save(sys.argv[1] if len(sys.argv) > 1 else "world.png")
    for s in scenes:
        print(s.caption, s.size)
