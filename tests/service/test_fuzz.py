"""Fuzzing the service: through its OpenAPI schema (schemathesis + hypothesis), no input,
valid or not, gives a 5xx, and every answer has a status, content type and body that the
schema documents; random and damaged image bytes get a 4xx, never a 5xx. Bounded: a few
dozen examples per operation and mode.

The long run (issue 12: at least 10,000 generated requests) takes more examples per case and
writes how many requests were made, and their status classes, to a JSON file:

    DSMI_FUZZ_EXAMPLES=400 DSMI_FUZZ_REPORT=fuzz.json .venv/bin/python -m pytest \
        tests/service/test_fuzz.py -p no:cacheprovider
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings
from tests.service_support import image_bytes, service_engine

# Every operation of the API; a test checks that this list is complete.
OPERATIONS = [
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/v1/galleries"),
    ("PUT", "/v1/galleries/{gallery}"), ("GET", "/v1/galleries/{gallery}"),
    ("POST", "/v1/galleries/{gallery}/images"), ("GET", "/v1/galleries/{gallery}/images"),
    ("GET", "/v1/galleries/{gallery}/images/{image_id}"),
    ("GET", "/v1/galleries/{gallery}/images/{image_id}/thumbnail"),
    ("DELETE", "/v1/galleries/{gallery}/images/{image_id}"),
    ("DELETE", "/v1/galleries/{gallery}"),
    ("POST", "/v1/galleries/{gallery}/query"),
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
EXISTING = "entrance"  # a gallery that exists, so that not every call is a 404
EXAMPLES = int(os.environ.get("DSMI_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
SENT: Counter[str] = Counter()  # status class ("2xx", "4xx", "5xx") -> requests


@pytest.fixture(scope="module", autouse=True)
def fuzz_report():
    yield
    path = os.environ.get("DSMI_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps({"examples_per_case": EXAMPLES,
                                          "requests": sum(SENT.values()),
                                          "by_status": dict(SENT)}, indent=2))


@pytest.fixture(scope="module")
def app():
    app = create_app(Settings(max_image_bytes=200_000, max_upload_bytes=1_000_000,
                              max_pixels=1_000_000), engine=service_engine())
    with TestClient(app) as client:
        for k in range(3):
            r = client.post(f"/v1/galleries/{EXISTING}/images",
                            files=[("images", ("a.jpg", image_bytes(k)))],
                            data={"person_id": f"p{k}", "camera_id": "1"})
            assert r.status_code == 201
        yield app


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_fuzzed_operations_are_all_of_them(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def _cases():
    for method, path in OPERATIONS:
        has_params = "{" in path or method == "POST"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode == GenerationMode.NEGATIVE and not has_params:
                continue  # nothing to get wrong
            yield pytest.param(method, path, mode, None, id=f"{method} {path} {mode.value}")
            if "{gallery}" in path and path != "/v1/galleries/{gallery}":
                yield pytest.param(method, path, mode, EXISTING,
                                   id=f"{method} {path} {mode.value} existing")


@pytest.mark.parametrize("method, path, mode, gallery", list(_cases()))
def test_no_input_gives_a_server_error(api_schema, method, path, mode, gallery):
    operation = api_schema[path][method]
    fixed = {"gallery": gallery} if gallery else None

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    @FUZZ
    def fuzz(case):
        response = case.call_and_validate(checks=CHECKS)
        SENT[f"{response.status_code // 100}xx"] += 1

    fuzz()


def _damaged(data: bytes):
    """Strategies for bytes near a real image: truncated, bit-flipped, spliced."""
    flips = st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)),
                     min_size=1, max_size=8)

    def flip(changes):
        out = bytearray(data)
        for pos, mask in changes:
            out[pos] ^= mask
        return bytes(out)

    return st.one_of(st.integers(0, len(data) - 1).map(lambda n: data[:n]), flips.map(flip),
                     st.binary(max_size=64).map(lambda junk: data[:40] + junk + data[40:]))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(seed))).save(buf, "PNG")
    return buf.getvalue()


def _float_tiff(bad: float) -> bytes:
    """A float TIFF with one NaN or infinite pixel (issue 19: once stored as a black image)."""
    values = np.linspace(0, 1, 48 * 96, dtype=np.float32).reshape(96, 48)
    values[10, 10] = bad
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "TIFF")
    return buf.getvalue()


def _mpo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 96), (200, 30, 30)).save(
        buf, "MPO", save_all=True, append_images=[Image.new("RGB", (48, 96), (0, 0, 200))])
    return buf.getvalue()


# Issue 19's hostile images, whole and damaged: a 16-bit PNG that decodes big, float TIFFs
# with NaN and infinite pixels, a multi-picture JPEG (MPO).
def _png16(side: int = 1000) -> bytes:
    """A small file that decodes big: a 16-bit greyscale gradient (issue 19: 37 KB at
    4000x4000 once took 424 MB to decode)."""
    ramp = np.add.outer(np.arange(side), np.arange(side)).astype(np.uint16) * 30
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    return buf.getvalue()


HOSTILE = [_png16(), _float_tiff(np.nan), _float_tiff(np.inf), _mpo()]


@pytest.mark.parametrize("route", ["upload", "query"])
def test_random_and_damaged_images_never_give_a_server_error(app, route):
    client = TestClient(app)
    sources = st.one_of(st.binary(max_size=256), _damaged(image_bytes(9)), _damaged(_png(9)),
                        st.sampled_from(HOSTILE), *(_damaged(h) for h in HOSTILE))

    @given(data=sources)
    @settings(max_examples=2 * EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(data):
        if route == "upload":
            r = client.post(f"/v1/galleries/{EXISTING}/images",
                            files=[("images", ("x.bin", data))],
                            data={"person_id": "p", "camera_id": "1"})
        else:
            r = client.post(f"/v1/galleries/{EXISTING}/query", files={"image": ("x.bin", data)})
        SENT[f"{r.status_code // 100}xx"] += 1
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert r.json()["error"]["code"] in ("invalid_image", "unsupported_image_format",
                                                 "image_too_large"), r.text

    fuzz()


def test_invented_methods_and_paths_never_give_a_server_error(app):
    """Issue 19: any method name and path gets a 4xx, and the metrics stay bounded."""
    client = TestClient(app)
    methods = st.from_regex(r"[A-Z][A-Z0-9]{0,11}", fullmatch=True)
    paths = st.one_of(st.sampled_from(["/", "/v1/galleries", f"/v1/galleries/{EXISTING}",
                                       f"/v1/galleries/{EXISTING}/images", "/metrics"]),
                      st.from_regex(r"/[a-z0-9/]{0,30}", fullmatch=True))

    @given(method=methods, path=paths)
    @settings(max_examples=2 * EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(method, path):
        r = client.request(method, path)
        SENT[f"{r.status_code // 100}xx"] += 1
        assert r.status_code < 500, (method, path, r.text)

    before = len(client.get("/metrics").text)
    fuzz()
    assert len(client.get("/metrics").text) < before + 20_000  # labels from closed sets
