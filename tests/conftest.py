import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real re-id images live beside the project, never inside it (../shared/data by default).
DATA_DIR = Path(os.environ.get("DSMI_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "cuhk03-labeled.csv").is_file():
        pytest.skip(f"shared re-id data not found at {DATA_DIR} (set DSMI_DATA)")
    return DATA_DIR
