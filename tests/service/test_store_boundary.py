"""What the store knows and holds: it never imports the engine (nor the ranker, nor ONNX
Runtime), and an uploaded item is stored as its gallery fields and its thumbnail only, no copy
of its conv5 map."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service.engine import Engine
from service.thumbnails import THUMBNAIL_FIELD
from tests.conftest import ROOT
from tests.service_support import exported_model_dir, image_bytes, make_client

STORE = ROOT / "service" / "store"
# What a store module must not import: the layers above it, and the model runtime.
ABOVE = ("service.engine", "service.ranking", "service.matching", "service.app",
         "service.routers", "onnxruntime", "torch")


def _imports(path) -> set[str]:
    """The absolute module names ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ["service", "store"]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path", sorted(STORE.glob("*.py")), ids=lambda p: p.name)
def test_no_store_module_imports_the_engine(path):
    bad = sorted(n for n in _imports(path) if n.startswith(ABOVE))
    assert not bad, f"{path.name} imports {bad}: the store must not call back into the engine"


def test_importing_the_store_loads_no_engine():
    code = ("import sys, service.store, service.store.resident, service.store.codec; "
            f"bad = [m for m in sys.modules if m.startswith({ABOVE!r})]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_an_upload_stores_the_gallery_fields_and_thumbnail_only(dtype):
    engine = Engine(exported_model_dir(), providers=["CPUExecutionProvider"],
                    cache_dtype=dtype, warmup=False)
    app, _ = make_client(engine, "memory")
    with TestClient(app) as client:
        r = client.post("/v1/galleries/g/images",
                        files=[("images", ("a.jpg", image_bytes(3)))],
                        data={"person_id": ["p"], "camera_id": ["1"]})
        assert r.status_code == 201, r.text
        image_id = r.json()["images"][0]["image_id"]
        asked = ["maps", "conv5", *engine.gallery_fields, THUMBNAIL_FIELD]
        blobs = app.state.store.get_blobs("g", image_id, asked)
    assert set(blobs) == {*engine.gallery_fields, THUMBNAIL_FIELD}
    for field in engine.gallery_fields:
        assert len(blobs[field]) == engine.codec.item_bytes(field)
    # dsmi-small: joint (64, 8, 4) and embedding (128,), 2 or 4 bytes a value.
    itemsize = 2 if dtype == "float16" else 4
    assert sum(len(blobs[f]) for f in engine.gallery_fields) == (64 * 8 * 4 + 128) * itemsize
