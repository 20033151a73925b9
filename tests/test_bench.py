"""`sdrt.bench`: the result's structure, that every stage was timed, the table and the JSON. No timing is
asserted (performance is measured in benchmarks/, never asserted in tests)."""
from __future__ import annotations

import json

import pytest

from sdrt.bench import STAGES, bench, format_table, timed_txt2img, write_json
from sdrt.errors import InvalidRequest


@pytest.fixture(scope="module")
def result(bundles):
    return bench(bundles["sd1"], steps=2, runs=2, warmup=1, command="sdrt bench TINY --steps 2 --runs 2 --warmup 1")


def test_structure_and_positive_timings(result):
    assert set(result) >= {"schema", "command", "machine", "versions", "config", "load_s", "stages", "images_per_s",
                           "memory"}
    assert result["command"] == "sdrt bench TINY --steps 2 --runs 2 --warmup 1"
    c = result["config"]
    assert (c["steps"], c["model_calls"], c["runs"], c["warmup"], c["batch"], c["unet_batch"]) == (2, 2, 2, 1, 1, 2)
    assert c["backend"] == "onnxruntime-cpu" and c["threads"] >= 1
    assert c["native_ops"] is True  # a C++ compiler here: sdrt's kernels run (runtime/engines/native_ops.py)
    assert (c["width"], c["height"]) == (64, 64)
    assert [key for key, _, _ in STAGES] == list(result["stages"])
    per_step = {"unet_step": 4, "sampler_step": 4}  # steps x runs; the others: one sample per run
    for key, s in result["stages"].items():
        assert s["samples"] == per_step.get(key, 2), key
        if key != "loop_overhead_step":  # a difference of two timings: may round to zero, even below it
            assert 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"], key
    assert result["images_per_s"] > 0 and result["load_s"] > 0
    m = result["memory"]
    assert m["peak_rss_mb"] >= m["peak_rss_after_load_mb"] > 0
    assert m["peak_device_mb"] is None  # CPU
    assert result["machine"]["cores"] >= 1 and result["machine"]["gpu"] is None
    assert set(result["versions"]) == {"sdrt", "numpy", "onnxruntime", "python"}


def test_table_and_json_round_trip(result, tmp_path):
    table = format_table(result)
    for _, label, _ in STAGES:
        assert label in table
    assert "images/s" in table and "peak RSS" in table
    path = tmp_path / "bench.json"
    write_json(result, path)
    assert json.loads(path.read_text()) == result


def test_guidance_off_and_a_multistep_sampler(bundles):
    r = bench(bundles["sd1"], sampler="heun", steps=2, runs=1, warmup=0, guidance=1.0)
    c = r["config"]
    assert (c["unet_batch"], c["model_calls"]) == (1, 3)  # Heun: 2N - 1 model calls
    assert r["stages"]["unet_step"]["samples"] == 3
    assert "sdrt.bench.bench(" in r["command"]


def test_the_pipeline_is_left_as_it_was(pipes):
    pipe = pipes["sd1"]
    unet = pipe.engines["unet"]
    times, images = timed_txt2img(pipe, "a red circle", steps=2, seed=1, watermark=False)
    assert not {"_job", "_conditioning", "_denoise", "decode"} & set(vars(pipe))
    assert pipe.engines["unet"] is unet
    assert len(times.unet) == 2 and len(times.text) == 1 and len(images) == 1
    # the instrumented run gives the plain run's image
    plain = pipe.txt2img("a red circle", steps=2, seed=1, watermark=False)[0]
    assert images[0].tobytes() == plain.tobytes()


@pytest.mark.parametrize("runs,warmup", [(0, 1), (2, -1), (True, 0)])
def test_bad_counts_are_refused(bundles, runs, warmup):
    with pytest.raises(InvalidRequest, match="runs|warmup"):
        bench(bundles["sd1"], runs=runs, warmup=warmup)


def test_bench_from_the_cli_prints_a_table_and_writes_json(bundles, tmp_path, capsys):
    from sdrt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", str(bundles["sd1"]), "--steps", "2", "--runs", "2", "--warmup", "1",
              "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "U-Net" in out
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["command"].startswith("sdrt ")  # the argv of the process (pytest's here)
    assert {key for key, _, _ in STAGES} <= set(data["stages"])
    with pytest.raises(SystemExit) as e:
        main(["bench", str(bundles["sd1"]), "--runs", "0"])
    assert e.value.code == 2
