"""bench/redis_bytes_bench.py on generated images and the service test model: the 'before'
design stores what the service stored until issue 20 (the map beside the fields), the others
what it stores now, and the bytes are counted from Redis (skipped without one)."""

import numpy as np

from bench.redis_bytes_bench import before_blobs, store_design
from service.engine import Engine
from service.matching import gallery_blobs, read_image
from tests.service_support import REDIS_URL, exported_model_dir, image_bytes, redis_client


def _engine(dtype):
    return Engine(exported_model_dir(), providers=["CPUExecutionProvider"], cache_dtype=dtype,
                  warmup=False)


def test_before_blobs_hold_the_map_beside_todays_fields():
    engine = _engine("float32")
    tensors = [engine.preprocess(image_bytes(k)) for k in range(3)]
    before, now = before_blobs(engine, tensors), gallery_blobs(engine, tensors)
    assert [set(b) for b in before] == [{*engine.gallery_fields, "maps"}] * 3
    for b, n, t in zip(before, now, tensors, strict=True):
        assert {f: b[f] for f in engine.gallery_fields} == n  # the fields as stored today
        maps = engine.encode(t[None], "b")[0]
        np.testing.assert_allclose(np.frombuffer(b["maps"], "<f4").reshape(maps.shape), maps,
                                   atol=1e-5)


def test_each_design_is_counted_in_redis_and_the_float16_one_is_smaller():
    redis_client()  # skips without Redis
    uploads = [(image_bytes(k), f"p{k}", "1") for k in range(40)]  # two upload batches
    f32, f16 = _engine("float32"), _engine("float16")
    decoded = [read_image(d, f32, 10**6, 10**7, thumbnail=True) for d, _, _ in uploads]
    tensors = [d.tensor for d in decoded]
    rows = {name: store_design(engine, REDIS_URL, decoded, uploads, blobs)
            for name, engine, blobs in (("before", f32, before_blobs(f32, tensors)),
                                        ("now", f16, gallery_blobs(f16, tensors)))}
    before, now = rows["before"], rows["now"]
    assert before["blob_bytes"]["maps"] == 512 * 8 * 4 * 4 and "maps" not in now["blob_bytes"]
    assert now["blob_bytes"]["joint"] * 2 == before["blob_bytes"]["joint"]
    for r in rows.values():
        # Redis holds at least what was written, and not wildly more.
        assert r["payload_bytes_per_item"] < r["memory_usage_bytes_per_item"] \
            < 2 * r["payload_bytes_per_item"]
    assert now["memory_usage_bytes_per_item"] < before["memory_usage_bytes_per_item"] / 5
