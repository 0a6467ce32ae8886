"""Overload: many concurrent clients querying one gallery through real HTTP.

``dsmi serve`` runs in a subprocess on Redis (a key prefix of its own, deleted afterwards)
with the bundled model; a gallery of ``--gallery`` CUHK03 ``train`` images (random images
without the shared data) is uploaded; then ``--clients`` asyncio clients query it in a loop
for ``--seconds``. Three designs in the same run:

- ``unbounded``: every request admitted (``DSMI_MAX_INFLIGHT_QUERIES`` huge), uvicorn's
  default 5 s keep-alive, every query streaming the gallery out of Redis and scoring all of
  it: the service before admission control and resident galleries;
- ``bounded``: admission control alone (as many queries in flight per worker as CPUs, at
  least 2; 503 + Retry-After past it; 75 s keep-alive), queries still streamed and exhaustive;
- ``default``: the defaults: admission control, resident galleries and two-stage retrieval.

Reported per design: admitted queries/s, p50/p95 latency of admitted (200) queries, refused
(503) per second, and connection errors (dropped or reset connections, never answered).
Clients that are refused wait ``Retry-After`` and try again, as a well-behaved client does.
Beside them, ``--slow-clients`` connections (default 6, issue 19's attack: four uploads and
two queries) send their bodies one byte every 0.3 s for the whole run, each reopened when the
service closes it; the row reports how many times the service cut one off.

    .venv/bin/python -m bench.overload_bench                      # 100 clients, 1,000 images
    .venv/bin/python -m bench.overload_bench --clients 20 --gallery 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python bench/overload_bench.py
    sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402

DATA = Path(os.environ.get("DSMI_DATA", ROOT.parent / "shared" / "data"))
_STREAMED = {"DSMI_CACHE_MAX_BYTES": "0", "DSMI_RERANK": "0"}
DESIGNS = {
    "unbounded": {"DSMI_MAX_INFLIGHT_QUERIES": "1000000", "DSMI_MAX_INFLIGHT_UPLOADS": "1000000",
                  "DSMI_KEEP_ALIVE_SECONDS": "5", **_STREAMED},
    "bounded": dict(_STREAMED),
    "default": {},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--gallery", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    p.add_argument("--slow-clients", type=int, default=6)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overload.json")
    return p.parse_args(argv)


def _images(n: int, offset: int = 0) -> list[tuple[str, bytes, str]]:
    """(person id, JPEG bytes, camera) for ``n`` gallery images."""
    manifest = DATA / "cuhk03-labeled.csv"
    if manifest.is_file():
        import csv

        with manifest.open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == "train"]
        rows = rows[offset:offset + n]
        return [(r["pid"], (DATA / r["path"]).read_bytes(), r["camid"]) for r in rows]
    from PIL import Image

    out = []
    for k in range(offset, offset + n):
        arr = np.random.default_rng(k).integers(0, 256, (160, 64, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG")
        out.append((str(k), buf.getvalue(), "1"))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(design: str, args, prefix: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSMI_")}
    env.update(DSMI_REDIS_URL=args.redis_url, DSMI_REDIS_PREFIX=prefix, DSMI_PROVIDERS="cpu",
               **DESIGNS[design])
    cmd = [sys.executable, "-m", "dsmi_cli", "serve", "--port", str(port),
           "--log-level", "warning"]
    if args.model_dir:
        cmd += ["--model-dir", str(args.model_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


async def _wait_ready(base: str, proc: subprocess.Popen) -> None:
    import httpx

    async with httpx.AsyncClient() as http:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError("dsmi serve exited")
            try:
                if (await http.get(f"{base}/readyz", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("dsmi serve did not become ready")


async def _upload(base: str, images) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300) as http:
        for start in range(0, len(images), 50):
            chunk = images[start:start + 50]
            r = await http.post(
                f"{base}/v1/galleries/bench/images",
                files=[("images", (f"{k}.jpg", data, "image/jpeg"))
                       for k, (_, data, _) in enumerate(chunk)],
                data={"person_id": [p for p, _, _ in chunk],
                      "camera_id": [c for _, _, c in chunk]})
            r.raise_for_status()


async def _load(base: str, probes, clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    counts = {"ok": 0, "refused": 0, "other": 0, "connection_errors": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    deadline = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < deadline:
            _, data, _ = probes[i % len(probes)]
            i += clients
            started = time.perf_counter()
            try:
                r = await http.post(f"{base}/v1/galleries/bench/query",
                                    files={"image": ("p.jpg", data, "image/jpeg")},
                                    data={"top_k": "10"})
            except httpx.TransportError:
                counts["connection_errors"] += 1
                continue
            if r.status_code == 200:
                counts["ok"] += 1
                latencies.append(time.perf_counter() - started)
            elif r.status_code == 503:
                counts["refused"] += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            else:
                counts["other"] += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {**counts, "seconds": round(elapsed, 1),
            "admitted_per_s": round(counts["ok"] / elapsed, 2),
            "refused_per_s": round(counts["refused"] / elapsed, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1)}


def _slow_clients(base: str, n: int, stop: threading.Event) -> tuple[list, list]:
    """``n`` dribbling connections (two thirds uploads, a third queries), each reopened when
    the service answers or closes it, until ``stop`` -> (threads, answers' status lines)."""
    from tests.service_support import dribble_body

    port = int(base.rsplit(":", 1)[1])
    answers: list[bytes] = []

    def dribble(k: int) -> None:
        path = "/v1/galleries/bench/query" if k % 3 == 2 else "/v1/galleries/bench/images"
        while not stop.is_set():
            answers.append(dribble_body(port, path, stop))

    threads = [threading.Thread(target=dribble, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    return threads, answers


def _delete_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


def main(argv=None) -> int:
    args = parse_args(argv)
    gallery = _images(args.gallery)
    probes = _images(50, offset=args.gallery)
    rows = []
    for design in args.designs:
        prefix = f"dsmi-bench-{uuid.uuid4().hex[:8]}:"
        proc, base = _start(design, args, prefix)
        try:
            asyncio.run(_wait_ready(base, proc))
            asyncio.run(_upload(base, gallery))
            stop = threading.Event()
            slow, answers = _slow_clients(base, args.slow_clients, stop)
            try:
                row = {"design": design, **asyncio.run(_load(base, probes, args.clients,
                                                             args.seconds))}
            finally:
                stop.set()
                for t in slow:
                    t.join(timeout=10)
            row["slow_clients"] = args.slow_clients
            row["slow_cut_off"] = sum(1 for a in answers if a)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            _delete_prefix(args.redis_url, prefix)
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = ("design", "admitted_per_s", "p50_ms", "p95_ms", "refused_per_s",
              "connection_errors", "other", "slow_clients", "slow_cut_off")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    write_results(args.out, {
        "clients": args.clients, "gallery": args.gallery, "seconds": args.seconds,
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
