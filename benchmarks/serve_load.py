"""`sdrt serve` under load: images/s and p50/p95 latency at 1, 4 and 8 concurrent clients, batching on vs off.

A load generator on loopback: each client sends txt2img requests one after another (a closed loop, different
prompts and seeds, the same size, steps and sampler, so the jobs can share U-Net calls). The server is
`sdrt serve` in a child process, started once with batching off (--max-batch 1) and once on (--max-batch 8,
--batch-window 50 ms), alternating over --rounds so the machine's drifting load hits both alike. Reported: per
concurrency, the ratio of throughputs on/off and the latencies; the server's peak RSS.

    python benchmarks/serve_load.py --steps 20 --requests 12 --rounds 2 \\
        --json benchmarks/results/serve_embedded.json
    python benchmarks/serve_load.py --model /tmp/sd15/bundle --width 512 --height 512 --steps 4 --requests 2 \\
        --clients 1 4 8 --rounds 1 --json benchmarks/results/serve_sd15.json      # full_size.py sd15 first

(--max-batch-megapixels 1.0 by default here, four 512x512 images per batch: the server's default, 0.25, would not
batch SD 1.5 at 512x512 at all.)
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

PROMPTS = ["a small red circle on a blue background", "a large green square on a white background",
           "a yellow triangle on a black background", "a small blue star on a red background"]


def start_server(args, batching: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sdrt.cli", "serve", "--port", str(port), "--queue", "1000",
           "--max-batch", str(args.max_batch if batching else 1), "--batch-window", str(args.window_ms),
           "--max-batch-megapixels", str(args.max_batch_megapixels)]
    if args.model:
        cmd += ["--model", str(args.model)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if requests.get(base + "/sdrt/v1/health", timeout=2).ok:
                return proc, base
        except requests.ConnectionError:
            if proc.poll() is not None:
                raise SystemExit(f"sdrt serve exited: {proc.stderr.read()}")
        time.sleep(0.2)
    raise SystemExit("sdrt serve did not start within 600 s")


def body(args, k: int, i: int) -> dict:
    return {"prompt": PROMPTS[(k + i) % len(PROMPTS)], "seed": 1000 * k + i, "steps": args.steps,
            "width": args.width, "height": args.height, "sampler_name": "Euler a", "cfg_scale": 7.0}


def load(base: str, args, clients: int, images: dict) -> dict:
    latencies, errors = [], []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(args.requests):
            t = time.perf_counter()
            try:
                r = requests.post(base + "/sdapi/v1/txt2img", json=body(args, k, i), timeout=3600)
            except requests.RequestException as e:  # the server died (out of memory): recorded, not hidden
                with lock:
                    errors.append(type(e).__name__)
                return
            with lock:
                (latencies if r.status_code == 200 else errors).append(time.perf_counter() - t if r.ok else r.status_code)
                if r.ok:
                    images[(clients, k, i)] = r.json()["images"][0]
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if not latencies:
        return {"clients": clients, "images": 0, "errors": errors, "wall_s": round(wall, 3), "images_per_s": 0.0,
                "p50_s": None, "p95_s": None}
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "images": len(latencies), "errors": errors, "wall_s": round(wall, 3),
            "images_per_s": round(len(latencies) / wall, 4), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(q[18], 3)}


def peak_rss_mb(proc: subprocess.Popen) -> float:
    with open(f"/proc/{proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run_mode(args, batching: bool, images: dict) -> tuple[list[dict], float, dict]:
    proc, base = start_server(args, batching)
    try:
        requests.post(base + "/sdapi/v1/txt2img", json=body(args, 0, 0), timeout=3600)  # warm-up: sessions, arenas
        rows = [load(base, args, c, images) for c in args.clients]
        stats = requests.get(base + "/sdrt/v1/health", timeout=10).json()
        return rows, peak_rss_mb(proc), stats
    finally:
        proc.terminate()
        proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a bundle (default: the embedded demo model)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--requests", type=int, default=12, help="requests per client per measurement")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--window-ms", type=float, default=50.0)
    ap.add_argument("--max-batch-megapixels", type=float, default=1.0, help="the server's; the results used 1.0")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = {"off": [], "on": []}
    rss = {"off": 0.0, "on": 0.0}
    images = {"off": {}, "on": {}}  # the same requests (client k's i-th) in both modes: batched = alone?
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            rows, peak, _ = run_mode(args, mode == "on", images[mode])
            runs[mode].append(rows)
            rss[mode] = max(rss[mode], peak)
    summary = []
    for j, c in enumerate(args.clients):
        per = {m: [r[j] for r in runs[m]] for m in runs}
        row = {"clients": c, "errors_off": sum(len(r["errors"]) for r in per["off"]),
               "errors_on": sum(len(r["errors"]) for r in per["on"])}
        for m in ("off", "on"):
            row[f"images_per_s_{m}"] = _median([r["images_per_s"] for r in per[m]])
            row[f"p50_s_{m}"] = _median([r["p50_s"] for r in per[m]])
            row[f"p95_s_{m}"] = _median([r["p95_s"] for r in per[m]])
        row["gain"] = round(row["images_per_s_on"] / row["images_per_s_off"], 3) if row["images_per_s_off"] else None
        summary.append(row)
        print(f"{c} clients: {row['images_per_s_off']} -> {row['images_per_s_on']} images/s ({row['gain']}x); p50 "
              f"{row['p50_s_off']} -> {row['p50_s_on']} s, p95 {row['p95_s_off']} -> {row['p95_s_on']} s; errors "
              f"{row['errors_off']} / {row['errors_on']}")
    diff = max_pixel_difference(images["off"], images["on"])
    print(f"batched vs alone, the same {diff[1]} requests: max {diff[0]}/255 per pixel")
    result = {"max_pixel_diff_batched_vs_alone": diff[0], "compared_images": diff[1],
              "command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": platform.machine(), "cpu": _cpu(), "model": str(args.model or "embedded"), "steps": args.steps,
              "size": [args.width, args.height], "max_batch": args.max_batch, "window_ms": args.window_ms,
              "max_batch_megapixels": args.max_batch_megapixels,
              "requests_per_client": args.requests, "rounds": args.rounds, "summary": summary, "runs": runs,
              "server_peak_rss_mb": rss}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def max_pixel_difference(a: dict, b: dict) -> tuple[int, int]:
    import base64
    import io

    import numpy as np
    from PIL import Image

    def pixels(text):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"), np.int16)
    keys = sorted(set(a) & set(b))
    return max((int(np.abs(pixels(a[k]) - pixels(b[k])).max()) for k in keys), default=0), len(keys)


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    main()
