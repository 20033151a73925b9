"""The runtime in a fresh process where torch, diffusers, transformers and onnx cannot be imported."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"torch", "diffusers", "transformers", "onnx", "safetensors", "accelerate"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)  # as if not installed
            return None

    sys.meta_path.insert(0, Block())
""")
NOTHING_LOADED = textwrap.dedent("""
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
""")


def run_blocked(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`script` in a fresh process where the blocked packages can't be imported; it must end having imported none
    of them, and exit 0."""
    done = subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(script) + NOTHING_LOADED],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
    return done


def test_generates_without_torch_diffusers_transformers_or_onnx(bundles, tmp_path):
    run_blocked(f"""
        import sdrt, numpy as np
        from sdrt.cli import main
        pipe = sdrt.Pipeline.load({str(bundles['sd2'])!r})
        image = pipe.txt2img("a red circle on a blue background", steps=3, seed=1)[0]
        assert image.size == (64, 64) and np.asarray(image).std() > 10
        try:
            main(["generate", "a cat", "--model", {str(bundles['sd1'])!r}, "--out", {str(tmp_path / 'cli.png')!r},
                  "--steps", "2", "--seed", "3"])
        except SystemExit as e:
            assert e.code == 0, e.code
    """)
    assert (tmp_path / "cli.png").is_file()


def test_export_without_torch_says_what_to_install(tmp_path):
    script = BLOCKER + textwrap.dedent(f"""
        from sdrt.cli import main
        main(["export", {str(tmp_path)!r}, "--out", {str(tmp_path / 'b')!r}])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 7
    assert done.stderr.strip() == ("error: exporting needs the export extra (torch is missing): "
                                   "pip install torch==2.13.0 'sdrt[export]'")


def test_the_server_runs_without_torch():
    """sdrt serve's app answers a txt2img request in a process where torch and the exporter can't be imported."""
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    run_blocked("""
        import json, socket, threading, time, urllib.request
        import uvicorn
        from sdrt.serve import ModelSet, Service, Settings, create_app
        service = Service(ModelSet([]), Settings(batch_window_s=0.0)).start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        body = json.dumps({"prompt": "a red square", "steps": 2, "seed": 1}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", body,
                                         {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200 and len(json.loads(r.read())["images"]) == 1
        server.should_exit = True
        service.close()
    """)
