"""Same seed, same image, on any machine: regenerate the committed golden images (tests/golden_images.py) on
this CPU and compare. The largest difference is reported whatever happens; the bar is 1/255 per channel."""
from __future__ import annotations

import json

import numpy as np
import pytest
from golden_images import GOLDEN, cases, machine, render
from PIL import Image

import sdrt

MAX_DIFF = 1  # /255, per channel


@pytest.fixture(scope="module")
def pipe():
    return sdrt.Pipeline.load()


def test_golden_images_regenerate_on_this_cpu(pipe, record_property, capsys):
    made_on = json.loads((GOLDEN / "golden.json").read_text())["made_on"]
    assert [c["name"] for c in json.loads((GOLDEN / "golden.json").read_text())["cases"]] == \
        [c["name"] for c in cases()]
    diffs = {}
    for case in cases():
        want = np.asarray(Image.open(GOLDEN / f"{case['name']}.png").convert("RGB"), dtype=np.int16)
        got = render(pipe, case).astype(np.int16)
        assert got.shape == want.shape, case["name"]
        diffs[case["name"]] = int(np.abs(got - want).max())
    worst = max(diffs.values())
    here = machine()
    summary = (f"golden images: largest pixel difference {worst}/255 over {len(diffs)} images; made on "
               f"{made_on['cpu']} ({', '.join(made_on['vector_extensions'][:3])}...), regenerated on {here['cpu']} "
               f"({', '.join(here['vector_extensions']) or 'no AVX'})")
    record_property("golden_max_pixel_diff", worst)
    with capsys.disabled():
        print("\n" + summary)
    assert worst <= MAX_DIFF, f"{summary}: {diffs}"


def test_the_golden_cases_differ_from_each_other():
    """The seeds, samplers and modes each change the picture: a golden set of one image repeated proves nothing."""
    pictures = [np.asarray(Image.open(GOLDEN / f"{c['name']}.png")) for c in cases()]
    for i in range(len(pictures)):
        for j in range(i + 1, len(pictures)):
            assert not np.array_equal(pictures[i], pictures[j]), (cases()[i]["name"], cases()[j]["name"])
