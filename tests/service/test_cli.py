"""``dsmi serve``: starts the service on the given host and port, fails fast without a model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import ROOT
from tests.service_support import exported_model_dir, image_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSMI_")}
    env["DSMI_PROVIDERS"] = "cpu"
    return env


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 120,
               in_a_row: int = 1) -> None:
    """Until ``/readyz`` answers 200 ``in_a_row`` times (each on a new connection: with
    several workers, whichever worker the kernel picks answers, so a worker still loading its
    model would have to be passed over every time); fails if the process exits or the time
    runs out."""
    deadline = time.monotonic() + timeout
    ready = 0
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            ready = ready + 1 if httpx.get(f"{base}/readyz", timeout=2).status_code == 200 else 0
            if ready >= in_a_row:
                return
            if ready:
                continue
        except httpx.TransportError:
            ready = 0
        assert time.monotonic() < deadline, "dsmi serve did not become ready"
        time.sleep(0.3)


def test_dsmi_serve_answers_on_the_given_port():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsmi_cli", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--model-dir", str(exported_model_dir()), "--log-level", "warning"],
        cwd=ROOT, env=serve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["store"] == "memory" and ready["persistent"] is False
        r = httpx.post(f"{base}/v1/galleries/g/images",
                       files=[("images", ("a.jpg", image_bytes(1))),
                              ("images", ("b.jpg", image_bytes(2)))],
                       data={"person_id": ["a", "b"], "camera_id": ["1", "1"]})
        assert r.status_code == 201, r.text
        r = httpx.post(f"{base}/v1/galleries/g/query",
                       files={"image": ("p.jpg", image_bytes(2))}, data={"top_k": "2"})
        assert [x["person_id"] for x in r.json()["results"]][0] == "b"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "IN-MEMORY GALLERY STORE" in output  # said loudly in the log


def test_dsmi_serve_without_a_model_fails_fast(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dsmi_cli", "serve", "--model-dir", str(tmp_path / "none"),
         "--port", str(free_port())], cwd=ROOT, env=serve_env(), capture_output=True,
        text=True, timeout=60)
    assert result.returncode == 2
    assert "no exported model" in result.stderr and str(tmp_path / "none") in result.stderr


def test_several_workers_need_redis():
    result = subprocess.run(
        [sys.executable, "-m", "dsmi_cli", "serve", "--workers", "2",
         "--model-dir", str(exported_model_dir()), "--port", str(free_port())],
        cwd=ROOT, env=serve_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "needs Redis" in result.stderr


def test_two_workers_report_the_service_as_a_whole(tmp_path):
    """Each scrape, whichever worker answers it, counts every worker's requests."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.service_support import REDIS_URL, delete_prefix, new_prefix, redis_client

    redis_client()  # skips without Redis
    prefix = new_prefix()
    port = free_port()
    env = {**serve_env(), "DSMI_REDIS_URL": REDIS_URL, "DSMI_REDIS_PREFIX": prefix}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsmi_cli", "serve", "--workers", "2", "--port", str(port),
         "--model-dir", str(exported_model_dir()), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base, timeout=180, in_a_row=20)  # both workers, not the first one
        sent = 0
        # A new connection each; which worker accepts it is the kernel's choice, so send
        # until both have counted some (one file of counts per worker process).
        while sent < 30 or (len(list(tmp_path.glob("counter_*.db"))) < 2 and sent < 1000):
            assert httpx.get(f"{base}/v1/galleries", timeout=10).status_code == 200
            sent += 1
        assert len(list(tmp_path.glob("counter_*.db"))) == 2

        def counted(text: str) -> float:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if (sample.name == "dsmi_http_requests_total"
                            and sample.labels.get("route") == "/v1/galleries"):
                        return sample.value
            return 0.0

        scrapes = [counted(httpx.get(f"{base}/metrics", timeout=10).text) for _ in range(8)]
        assert scrapes == [float(sent)] * 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        delete_prefix(prefix)
