import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Redis servers, a replica pair and a Redis Cluster on free loopback ports, as fixtures.
pytest_plugins = ["tests.redis_cluster"]

ROOT = Path(__file__).resolve().parents[1]
# Real re-id images live beside the project, never inside it (../shared/data by default).
DATA_DIR = Path(os.environ.get("DSMI_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "cuhk03-labeled.csv").is_file():
        pytest.skip(f"shared re-id data not found at {DATA_DIR} (set DSMI_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    """16 people, 2 cameras, 3 images each per camera; each person has its own colours."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    rows = []
    for pid in range(16):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        for cam in (1, 2):
            for k in range(3):
                img = np.zeros((96, 48, 3), np.uint8)
                img[:48], img[48:] = top, bottom
                img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
                name = f"{pid:04d}_{cam}_{k}.png"
                Image.fromarray(img).save(root / name)
                rows.append((name, pid, cam, "train" if pid < 12 else "test"))
    with (root / "tiny.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "pid", "camid", "split"])
        writer.writerows(rows)
    return root / "tiny.csv"
