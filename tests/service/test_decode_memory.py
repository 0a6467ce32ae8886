"""Decoding memory bounded in bytes: wide greyscale images scaled without float64 copies, a
per-image limit from the header, a limit on bytes decoded at once, NaN pixels refused, MPO
read as its first picture."""

from __future__ import annotations

import io
import threading
import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.preprocess import ImageDecodeError, decode_bytes, decode_image, header_decode_bytes
from service.domain import Overloaded
from service.errors import domain_status
from service.matching import DecodeBudget
from tests.service.test_api import assert_error, query, upload
from tests.service_support import image_bytes, make_client


def png16(width: int, height: int) -> bytes:
    values = (np.arange(width * height) % 65536).astype(np.uint16).reshape(height, width)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    return buf.getvalue()


def test_a_16_bit_4000x4000_png_decodes_without_float64_copies():
    data = png16(4000, 4000)
    assert len(data) < 400_000  # a small file that decodes to 16 M pixels
    tracemalloc.start()
    try:
        image = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.mode == "RGB" and image.size == (4000, 4000)
    # The float64 path held three 128 MB arrays at once; scaled a few rows at a time, the
    # arrays are the uint16 view and the uint8 result.
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    pixels = np.asarray(image)[:, :, 0]
    assert pixels.min() == 0 and pixels.max() == 255  # the range is scaled, not clipped


def test_the_decode_estimate_refuses_big_decodes_from_the_header():
    data = png16(4000, 4000)
    assert header_decode_bytes(data) == decode_bytes(4000, 4000, "I;16") > 64 * 2**20
    with pytest.raises(ImageDecodeError, match="MiB allowed per image") as exc:
        decode_image(data, max_decode_bytes=64 * 2**20)
    assert exc.value.reason == "too_many_pixels"
    assert header_decode_bytes(b"not an image") == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_pixels_that_are_not_numbers_are_refused_not_blanked(bad):
    values = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    values[5, 7] = bad
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "TIFF")
    with pytest.raises(ImageDecodeError, match="NaN or infinite"):
        decode_image(buf.getvalue())
    values[5, 7] = 0.5
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "TIFF")
    assert np.asarray(decode_image(buf.getvalue())).std() > 0


def mpo_bytes() -> bytes:
    first = Image.new("RGB", (48, 96), (200, 30, 30))
    second = Image.new("RGB", (48, 96), (30, 30, 200))
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])
    return buf.getvalue()


def test_a_multi_picture_jpeg_is_read_as_its_first_picture():
    data = mpo_bytes()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = decode_image(data)
    r, g, b = np.asarray(image).reshape(-1, 3).mean(0)
    assert r > 150 and b < 80


def test_the_budget_refuses_a_decode_past_it_and_always_admits_one():
    budget = DecodeBudget(100)
    with budget.hold(80):
        with pytest.raises(Overloaded) as exc:
            with budget.hold(30):
                pass
        assert domain_status(exc.value) == (503, {"Retry-After": "1"})
        assert exc.value.code == "overloaded"
        with budget.hold(20):
            assert budget.in_flight == 100
    assert budget.in_flight == 0
    with budget.hold(10_000):  # alone, any size within the per-image limit
        assert budget.in_flight == 10_000


@pytest.fixture
def memory_client(engine):
    app, _ = make_client(engine, "memory", max_decode_bytes=64 * 2**20, max_pixels=16_000_000)
    with TestClient(app) as c:
        yield c


def test_the_service_answers_decode_limits_and_nan_with_clear_errors(memory_client):
    error = assert_error(upload(memory_client, "g", [png16(4000, 4000)]), 413,
                         "image_too_large")
    assert "MiB allowed per image" in error["message"]  # the decode limit, not the pixels
    values = np.ones((40, 30), np.float32)
    values[0, 0] = np.nan
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "TIFF")
    error = assert_error(upload(memory_client, "g", [image_bytes(1), buf.getvalue()]), 400,
                         "invalid_image")
    assert "NaN" in error["message"]
    assert memory_client.get("/v1/galleries/g/images").status_code == 404  # nothing stored
    r = upload(memory_client, "g", [mpo_bytes()])
    assert r.status_code == 201, r.text
    assert query(memory_client, "g", mpo_bytes()).status_code == 200


def test_concurrent_decodes_past_the_budget_get_503_and_nothing_half_stored(engine):
    app, _ = make_client(engine, "memory", max_decode_bytes_in_flight=100 * 2**20,
                         max_pixels=16_000_000)
    big = png16(3000, 3000)  # about 52 MiB of decoding each
    results = []
    with TestClient(app) as client:
        def send():
            results.append(upload(client, "g", [big]).status_code)
        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(results) <= {201, 503} and 201 in results
        listed = client.get("/v1/galleries/g/images").json()
        assert listed["total"] == results.count(201)
