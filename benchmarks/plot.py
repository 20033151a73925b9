"""The side-by-side ratios as a bar chart: for every compare.py result and every peer in it, sdrt's time over
the peer's per stage, on a log scale around 1 (bars going down: sdrt is faster), with the PSNR between the
two images under each group.

    python benchmarks/plot.py [benchmarks/results/compare*.json ...] [--out benchmarks/results/compare.png]

Uses matplotlib when it is installed, else draws with Pillow (a runtime dependency already).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("text_encoder", "unet_step", "vae_decode", "end_to_end", "outside_unet")
LABELS = {"text_encoder": "text encoder", "unet_step": "U-Net step", "vae_decode": "VAE decode",
          "end_to_end": "end to end", "outside_unet": "outside the U-Net"}
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
TITLE = "sdrt time / peer time, per stage (log scale; below 1x: sdrt is faster)"


def groups(paths: list[Path]) -> list[dict]:
    """One group per (result file, peer): its label and its ratios."""
    out = []
    for path in paths:
        result = json.loads(path.read_text())
        c = result["config"]
        path = Path(c["model"])  # a diffusers folder; "model" says less than the folder holding it
        model = "tiny sd1" if c["model"].startswith("tiny") else (path.parent.name if path.name == "model" else path.name)
        for name, peer in result["peers"].items():
            psnr = "images identical" if peer["psnr_db"] is None else f"PSNR {peer['psnr_db']:.1f} dB"
            theirs = peer.get("threads", c["threads"])
            threads = f"{c['threads']} vs {theirs}" if theirs != c["threads"] else f"{c['threads']}"
            threads += " thread" if threads == "1" else " threads"
            out.append({
                "title": f"vs {name.removeprefix('diffusers ')}",
                "detail": f"{model} {c['width']}x{c['height']}, {c['steps']} steps\n{threads}, {psnr}",
                "ratios": [peer["ratio"].get(s) for s in STAGES],
            })
    return out


def _fmt(r: float) -> str:
    return f"{r:.2f}" if r < 10 else f"{r:.0f}"


def _tick(e: int) -> str:
    return f"{2**e:g}x" if e >= 0 else f"1/{2**-e}x"


def _bounds(gs: list[dict]) -> tuple[int, int]:
    """log2 of the axis ends: powers of two around every ratio and 1."""
    values = [r for g in gs for r in g["ratios"] if r] + [1.0]
    return math.floor(math.log2(min(values) / 1.15)), math.ceil(math.log2(max(values) * 1.15))


def plot_matplotlib(gs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = _bounds(gs)
    width = 0.8 / len(STAGES)
    fig_w = max(7.5, 2.6 * len(gs) + 2)
    fig, ax = plt.subplots(figsize=(fig_w, 4.8))
    for k, stage in enumerate(STAGES):
        xs = [g_i + (k - (len(STAGES) - 1) / 2) * width for g_i in range(len(gs))]
        rs = [g["ratios"][k] for g in gs]
        bars = ax.bar([x for x, r in zip(xs, rs) if r], [r - 1 for r in rs if r], width, bottom=1,
                      color=COLORS[k], label=LABELS[stage])
        for bar, r in zip(bars, [r for r in rs if r]):
            ax.annotate(_fmt(r), (bar.get_x() + bar.get_width() / 2, r), ha="center", fontsize=7,
                        va="bottom" if r >= 1 else "top", xytext=(0, 2 if r >= 1 else -2), textcoords="offset points")
    ax.set_yscale("log", base=2)
    ax.set_ylim(2.0**lo, 2.0**hi)
    ax.set_yticks([2.0**e for e in range(lo, hi + 1)], [_tick(e) for e in range(lo, hi + 1)])
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks(range(len(gs)), [f"{g['title']}\n{g['detail']}" for g in gs], fontsize=8)
    ax.set_xlim(-0.6 if len(gs) > 1 else -0.9, len(gs) - (0.4 if len(gs) > 1 else 0.1))
    ncol = len(STAGES) if fig_w >= 9 else 3
    ax.set_title(TITLE, fontsize=10, pad=24 if ncol == len(STAGES) else 36)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=ncol, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)


def plot_pil(gs: list[dict], out: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)  # a TrueType font when Pillow has FreeType
        except TypeError:  # older Pillow: the fixed bitmap font
            return ImageFont.load_default()

    small, normal = font(12), font(14)
    lo, hi = _bounds(gs)
    bar, group_gap, left, right, top, bottom = 30, 90, 70, 30, 95, 90
    group_w = bar * len(STAGES)
    used = len(gs) * group_w + (len(gs) - 1) * group_gap
    width = max(left + right + used + 20, 760)
    start = left + (width - left - right - used) / 2  # the groups centred in the plot area
    height = top + 320 + bottom
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    def y(r: float) -> float:
        return top + (hi - math.log2(r)) / (hi - lo) * 320

    d.text((left, 12), TITLE, fill="black", font=normal)
    for k, stage in enumerate(STAGES):  # legend
        x = left + k * 135
        d.rectangle([x, 40, x + 12, 52], fill=COLORS[k])
        d.text((x + 17, 39), LABELS[stage], fill="black", font=small)
    for e in range(lo, hi + 1):  # grid at powers of two
        yy = y(2.0**e)
        d.line([left, yy, width - right, yy], fill="black" if e == 0 else "#dddddd", width=2 if e == 0 else 1)
        d.text((left - 8, yy), _tick(e), fill="black", font=small, anchor="rm")
    for i, g in enumerate(gs):
        x0 = start + i * (group_w + group_gap)
        for k, r in enumerate(g["ratios"]):
            if not r:
                continue
            xa = x0 + k * bar
            y1, y0 = sorted((y(1.0), y(r)))
            d.rectangle([xa + 2, y1, xa + bar - 2, max(y0, y1 + 1)], fill=COLORS[k])
            label_y, anchor = (y(r) - 3, "mb") if r >= 1 else (y(r) + 3, "mt")
            d.text((xa + bar / 2, label_y), _fmt(r), fill="black", font=small, anchor=anchor)
        center = x0 + group_w / 2
        d.text((center, top + 320 + 14), g["title"], fill="black", font=normal, anchor="mt")
        for n, line in enumerate(g["detail"].splitlines()):
            d.text((center, top + 320 + 36 + 16 * n), line, fill="#444444", font=small, anchor="mt")
    img.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="*", help="compare.py JSON files (default: results/compare*.json)")
    ap.add_argument("--out", type=Path, default=RESULTS / "compare.png")
    ap.add_argument("--with", dest="library", choices=("auto", "matplotlib", "pillow"), default="auto")
    args = ap.parse_args()
    paths = args.results or sorted(RESULTS.glob("compare*.json"))
    if not paths:
        ap.error(f"no compare*.json in {RESULTS}; run benchmarks/compare.py --json first")
    gs = groups(paths)
    library = args.library
    if library == "auto":
        try:
            import matplotlib  # noqa: F401

            library = "matplotlib"
        except ImportError:
            library = "pillow"
    (plot_matplotlib if library == "matplotlib" else plot_pil)(gs, args.out)
    print(f"wrote {args.out} ({library}; {len(gs)} comparisons from {len(paths)} files)")


if __name__ == "__main__":
    main()
