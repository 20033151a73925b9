"""The CLI: one line on stderr and a non-zero exit for bad input, no traceback, no output file."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdrt

from sdrt.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_generate_writes_a_png_with_a1111_parameters(bundles, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, _ = run(capsys, "generate", "a red circle", "--model", bundles["sd1"], "--out", out,
                          "--steps", 3, "--seed", 5, "--sampler", "DDIM", "--negative-prompt", "blurry")
    assert code == 0 and str(out) in stdout
    params = Image.open(out).text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 5")
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]  # no temp files left


def test_generate_with_prompt_options_and_an_embedding(bundles, tmp_path, capsys):
    from safetensors.numpy import save_file

    save_file({"emb_params": np.ones((2, 32), np.float32)}, str(tmp_path / "shiny.safetensors"))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a (32, 32) projection
    save_file({f"{key}.lora_down.weight": np.ones((2, 32), np.float32),
               f"{key}.lora_up.weight": np.ones((32, 2), np.float32)}, str(tmp_path / "glow.safetensors"))
    out = tmp_path / "o.png"
    code, stdout, _ = run(capsys, "generate", "a (shiny:1.2) cat <lora:glow:0.3>", "--model", bundles["sd1"],
                          "--out", out, "--steps", 2, "--clip-skip", 2, "--no-emphasis", "--truncate",
                          "--embedding", tmp_path / "shiny.safetensors", "--lora-dir", tmp_path,
                          "--lora", f"{tmp_path / 'glow.safetensors'}:0.2")
    assert code == 0 and "embedding 'shiny'" in stdout
    params = Image.open(out).text["parameters"]
    assert "Clip skip: 2" in params and "Emphasis: None" in params and "Lora: glow: 0.2, glow: 0.3" in params


def test_generate_batch_writes_one_file_per_image(bundles, tmp_path, capsys):
    code, _, _ = run(capsys, "generate", "x", "--model", bundles["sd2"], "--out", tmp_path / "b.png",
                     "--batch", 2, "--steps", 2, "--seed", 1, "--width", 48)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-0.png", "b-1.png"]
    assert "Seed: 2" in Image.open(tmp_path / "b-1.png").text["parameters"]
    assert Image.open(tmp_path / "b-1.png").size == (48, 64)


def _corrupt_copy(bundles, tmp_path):
    target = tmp_path / "corrupt"
    shutil.copytree(bundles["sd1"], target)
    (target / "unet" / "model.onnx").write_bytes(b"garbage")
    return target


GENERATE_ERRORS = [  # extra arguments, exit code, the line on stderr (after "error: ")
    (["--steps", "0"], 2, "steps must be a whole number from 1 to 1000, got 0"),
    (["--guidance", "-1"], 2, "guidance must be a finite number >= 0"),
    (["--guidance", "nan"], 2, "guidance must be a finite number >= 0 (values <= 1 turn classifier-free guidance off), got nan"),
    (["--sampler", "k_dpm_9"], 2, "unknown sampler 'k_dpm_9'; known samplers: ddim (DDIM), pndm (PLMS), "),
    (["--sampler", "euler", "--eta", "0.5"], 2, "sampler 'euler' takes no eta; eta applies to ddim"),
    (["--sampler", "ddim", "--eta", "1.5"], 2, "eta must be a number from 0 to 1, got 1.5"),
    (["--clip-skip", "0"], 2, "clip skip must be a whole number from 1 to 2, got 0"),
    (["--embedding", "/nonexistent/x.pt"], 2, "embedding file '/nonexistent/x.pt' does not exist"),
    (["--lora", "/nonexistent/x.safetensors:0.5"], 2, "LoRA file '/nonexistent/x.safetensors' does not exist"),
    (["--height", "65"], 2, "height must be a positive multiple of 8, got 65; use 64 or 72"),
    (["--width", "0"], 2, "width must be a positive multiple of 8, got 0"),
    (["--batch", "0"], 2, "batch must be a whole number from 1 to 64, got 0"),
    (["--seed", "-3"], 2, "seed must be a whole number from 0 to 2**64-1"),
    (["--steps", "many"], 2, "Invalid value for '--steps'"),
]


@pytest.mark.parametrize("extra,code,message", GENERATE_ERRORS, ids=[e[2][:30] for e in GENERATE_ERRORS])
def test_generate_refuses_bad_input(bundles, tmp_path, capsys, extra, code, message):
    got, stdout, err = run(capsys, "generate", "a cat", "--model", bundles["sd1"], "--out", tmp_path / "x.png", *extra)
    assert got == code
    assert err.count("\n") == 1 and err.startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_bad_bundles_and_paths(bundles, tmp_path, capsys):
    cases = [
        (["--model", tmp_path / "missing", "--out", tmp_path / "a.png"], 3, "does not exist or is not a folder"),
        (["--model", _corrupt_copy(bundles, tmp_path), "--out", tmp_path / "b.png"], 3,
         "model.onnx' does not match its sha256 in sdrt.json (corrupt or modified)"),
        (["--model", bundles["sd1"], "--out", tmp_path / "no" / "c.png"], 2, "does not exist; create it first"),
        (["--model", bundles["sd1"], "--out", tmp_path], 2, "is a directory; give a file name"),
        (["--model", bundles["sd1"], "--out", tmp_path / "d.jpg"], 2, "must end in .png"),
        (["--model", bundles["sd1"], "--out", "/proc/sdrt-test.png"], 2, "could not write"),
    ]
    for argv, code, message in cases:
        got, _, err = run(capsys, "generate", "a cat", "--steps", 1, *argv)
        assert (got, err.count("\n")) == (code, 1) and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"]


def test_export_refuses_bad_sources(models, bundles, tmp_path, capsys):
    code, _, err = run(capsys, "export", tmp_path, "--out", tmp_path / "b")
    assert code == 4 and err.startswith("error: ") and "is not a diffusers model folder" in err
    code, _, err = run(capsys, "export", models["sd1"], "--out", bundles["sd2"])
    assert code == 2 and "already exists; choose another --out or pass --force" in err
    assert [p.name for p in tmp_path.iterdir()] == []


def test_export_refuses_a_pickle_only_source_without_the_flag(models, tmp_path, capsys):
    from test_export import _pickle_only_copy

    src = _pickle_only_copy(models, tmp_path)
    code, _, err = run(capsys, "export", src, "--out", tmp_path / "b")
    assert code == 4 and err.count("\n") == 1 and "pass --allow-pickle" in err
    assert not (tmp_path / "b").exists()


def test_export_then_info(models, tmp_path, capsys):
    code, stdout, _ = run(capsys, "export", models["sd2"], "--out", tmp_path / "b", "--width", 96)
    assert code == 0 and "96x64" in stdout
    code, stdout, _ = run(capsys, "info", tmp_path / "b")
    assert code == 0 and "all files match their sha256" in stdout and "v_prediction" in stdout
    assert "ddim (DDIM), pndm (PLMS), lms (LMS)" in stdout and "dpmpp_2m_karras (DPM++ 2M Karras)" in stdout
    assert "watermark    active: dwtDct, payload 'StableDiffusionV1'" in stdout


def test_info_on_a_missing_bundle(tmp_path, capsys):
    code, _, err = run(capsys, "info", tmp_path / "nothing")
    assert code == 3 and err.count("\n") == 1


def test_a_real_process_prints_no_traceback_unless_debug(tmp_path):
    cmd = [sys.executable, "-m", "sdrt.cli", "generate", "x", "--model", str(tmp_path / "none"), "--out",
           str(tmp_path / "x.png")]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 3 and "Traceback" not in plain.stderr and plain.stderr.count("\n") == 1
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "BundleNotFound" in debug.stderr


def test_version(capsys):
    code, stdout, _ = run(capsys, "--version")
    assert code == 0 and stdout.strip() == f"sdrt {sdrt.__version__}"


def test_ctrl_c_during_generation_writes_nothing(bundles, tmp_path):
    """SIGINT mid-run: exit 130, one line, no image and no temp file left."""
    import signal
    import time

    out = tmp_path / "x.png"
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "generate", "a cat", "--model", str(bundles["sd1"]),
                             "--out", str(out), "--steps", "1000", "--height", "256", "--width", "256"],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # past start-up and bundle loading, inside the denoising loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "error: interrupted; nothing was written\n"
    assert list(tmp_path.iterdir()) == []


def test_generate_without_a_model_and_no_embedded_one_says_what_to_do(tmp_path, capsys, monkeypatch):
    from sdrt import embedded

    monkeypatch.setattr(embedded, "BUNDLE", tmp_path / "no-bundle")
    code, _, err = run(capsys, "generate", "a cat", "--out", tmp_path / "x.png")
    assert code == 3 and err.count("\n") == 1
    assert "embedded demo model is missing from this install" in err and "--model BUNDLE" in err
    assert not (tmp_path / "x.png").exists()
