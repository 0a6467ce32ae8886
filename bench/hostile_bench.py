"""Hostile clients against the service, the figures of the second hardening round in one run.

- ``slow``: six connections dribbling request bodies (four uploads, two queries, one byte
  every 0.3 s) against a real uvicorn server on loopback for ``--slow-seconds``, while a
  normal client (another process's address would be the same here: loopback) queries in a
  loop: its answers by status. The slow ones get 408 after the body deadline.
- ``methods``: ``--methods`` requests with invented HTTP methods (``M0000001``, ...) through
  the app: the process's RSS growth and the size of ``/metrics`` after them.
- ``decode``: peak RSS of decoding one 16-bit 4000x4000 PNG, in a fresh process each: today's
  decoder, and the float64 conversion it replaced (``before``).

    .venv/bin/python -m bench.hostile_bench          # bench/results/hostile.json
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def png16() -> bytes:
    from PIL import Image

    values = (np.arange(4000 * 4000) % 65536).astype(np.uint16).reshape(4000, 4000)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    return buf.getvalue()


def decode_worker(design: str, path: Path) -> dict:
    from PIL import Image

    data = path.read_bytes()  # made by the parent: this process's peak is the decoding's
    Path("/proc/self/clear_refs").write_text("5")  # restart the RSS high-water mark here
    before = _status_mib("VmHWM")
    if design == "before":  # the conversion this round replaced
        img = Image.open(io.BytesIO(data))
        img.load()
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255
        Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    else:
        from model.preprocess import decode_image
        decode_image(data)
    peak = _status_mib("VmHWM")
    return {"design": design, "file_bytes": len(data), "peak_rss_mib": peak,
            "rss_before_mib": before, "decode_peak_mib": peak - before}


def bench_decode() -> list[dict]:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "16bit.png"
        path.write_bytes(png16())
        for design in ("before", "now"):
            out = subprocess.run([sys.executable, "-m", "bench.hostile_bench",
                                  "--decode-worker", design, "--png", str(path)], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def bench_methods(engine, count: int) -> dict:
    from fastapi.testclient import TestClient

    from tests.service_support import make_client

    app, _ = make_client(engine, "memory")
    with TestClient(app) as client:
        client.get("/metrics")
        start = rss_mib()
        for k in range(count):
            client.request(f"M{k:07d}", "/healthz")
        grown = rss_mib() - start
        t0 = time.perf_counter()
        body = client.get("/metrics").content
        scrape = time.perf_counter() - t0
    return {"requests": count, "rss_growth_mib": grown, "metrics_bytes": len(body),
            "scrape_s": scrape}


SLOW_KEY, NORMAL_KEY = "slow-client-key", "normal-client-key"


def bench_slow(engine, seconds: float, keys: bool) -> dict:
    """``keys``: the dribblers and the normal client each have an API key of their own (else
    all come from one loopback address, and share its slots)."""
    import httpx

    from tests.service_support import ThreadedServer, dribble_body, image_bytes, make_client

    settings = {"api_keys": [f"{SLOW_KEY}:read+write:*", f"{NORMAL_KEY}:read+write:*"]} \
        if keys else {}
    app, _ = make_client(engine, "memory", max_image_bytes=10 * 2**20,
                         max_upload_bytes=64 * 2**20, **settings)
    normal = {"X-API-Key": NORMAL_KEY} if keys else {}
    slow_key = f"X-API-Key: {SLOW_KEY}\r\n" if keys else ""
    with ThreadedServer(app) as server:
        files = [("images", ("a.jpg", image_bytes(1), "image/jpeg"))]
        httpx.post(f"{server.url}/v1/galleries/g/images", files=files, headers=normal,
                   data={"person_id": "p", "camera_id": "c"}).raise_for_status()
        stop = threading.Event()
        slow_answers: list[bytes] = []

        def dribble(path: str) -> None:
            slow_answers.append(dribble_body(server.port, path, stop, slow_key))
        threads = [threading.Thread(target=dribble, args=(p,), daemon=True) for p in
                   ["/v1/galleries/g/images"] * 4 + ["/v1/galleries/g/query"] * 2]
        for t in threads:
            t.start()
        time.sleep(0.5)
        statuses: Counter = Counter()
        end = time.monotonic() + seconds
        with httpx.Client(timeout=30, headers=normal) as client:
            while time.monotonic() < end:
                r = client.post(f"{server.url}/v1/galleries/g/query",
                                files={"image": ("p.jpg", image_bytes(2), "image/jpeg")})
                statuses[r.status_code] += 1
        stop.set()
        for t in threads:
            t.join(timeout=5)
    return {"seconds": seconds, "keys": keys, "normal_statuses": dict(statuses),
            "slow_answers": [a.decode(errors="replace") for a in slow_answers]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", type=int, default=60_000)
    p.add_argument("--slow-seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hostile.json")
    p.add_argument("--decode-worker", choices=("before", "now"), help=argparse.SUPPRESS)
    p.add_argument("--png", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.decode_worker:
        print(json.dumps(decode_worker(args.decode_worker, args.png)))
        return 0
    from bench.common import machine_info, write_results
    from tests.service_support import service_engine

    engine = service_engine()
    result = {"machine": machine_info(), "decode": bench_decode()}
    for row in result["decode"]:
        print(f"decode 16-bit 4000x4000 PNG ({row['file_bytes']:,} bytes), {row['design']:<6}: "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB, {row['decode_peak_mib']:.0f} MiB above "
              "the process before it", flush=True)
    result["slow"] = [bench_slow(engine, args.slow_seconds, keys) for keys in (False, True)]
    for row in result["slow"]:
        who = "own API keys" if row["keys"] else "one loopback address, no keys"
        print(f"normal client's queries beside 6 dribbling connections ({who}), "
              f"{args.slow_seconds:.0f} s: {row['normal_statuses']}; dribblers got "
              f"{sorted(set(row['slow_answers']))}", flush=True)
    result["methods"] = bench_methods(engine, args.methods)
    m = result["methods"]
    print(f"{m['requests']:,} invented methods: RSS +{m['rss_growth_mib']:.1f} MiB, /metrics "
          f"{m['metrics_bytes']:,} bytes, scraped in {m['scrape_s'] * 1e3:.0f} ms", flush=True)
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
