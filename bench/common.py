"""What the benchmarks share: the machine they ran on, and how their results are written."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["machine_info", "write_results", "tile_gallery", "before_model_dir",
           "before_engine", "small_model_dir", "BEFORE_COMMIT", "SMALL_MODEL_COMMIT"]

ROOT = Path(__file__).resolve().parents[1]
# The last commit whose bundled model has the channels-first head (one chunk at a time): the
# service as issue 11 measured it. Its head scores what today's does (max |difference| 2.4e-7
# on 200 CUHK03 images, scripts/rebuild_head.py), more slowly.
BEFORE_COMMIT = "da2961c"
# The last commit whose bundled model is dsmi-small (with today's channels-last head): the
# model the head and gallery benchmarks compare with BEFORE_COMMIT's, and the one the
# Lite0 model replaced (bench.model_bench).
SMALL_MODEL_COMMIT = "42da5b2"


def machine_info() -> dict:
    """The machine a benchmark ran on: CPU, usable CPUs, load, library versions, GPU."""
    import onnxruntime as ort
    try:
        import torch
    except ImportError:  # the service-side benchmarks run without PyTorch too
        torch = None

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__ if torch else None,
        "torch_threads": torch.get_num_threads() if torch else None,
        "onnxruntime": ort.__version__,
        "onnxruntime_available_providers": ort.get_available_providers(),
        "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch and torch.cuda.is_available() else None,
    }
    return info


def write_results(path: Path, result: dict, note: str = "") -> None:
    """``result`` as indented JSON at ``path`` (folders made), and a line saying so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}{note}")


def tile_gallery(gallery: dict, n: int, seed: int = 0, noise: float = 0.01) -> dict:
    """``n`` gallery items from the prepared ``gallery`` (tiled), each field plus Gaussian
    noise of ``noise`` x its standard deviation, so that the copies are distinct items
    (equal copies would tie, and ties are not what a real gallery looks like)."""
    rng = np.random.default_rng(seed)
    out = {}
    for f, v in gallery.items():
        v = np.asarray(v, dtype=np.float32)
        reps = -(-n // len(v))
        tiled = np.concatenate([v] * reps)[:n]
        jitter = rng.standard_normal(tiled.shape, dtype=np.float32) * (noise * float(v.std()))
        out[f] = np.ascontiguousarray(tiled + jitter)
    return out


def before_model_dir(path: Path | None = None, commit: str = BEFORE_COMMIT) -> Path:
    """The bundled model folder as of ``commit`` (default :data:`BEFORE_COMMIT`, the "before"
    design of the benchmarks), taken out of this checkout's git history into a temporary
    folder, or ``path`` when given. Exits with a message when neither works."""
    if path is not None:
        return Path(path)
    target = Path(tempfile.mkdtemp(prefix="dsmi-before-model-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit,
                                  "service/default_model"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or str(exc).encode()
        raise SystemExit(f"cannot take the model of commit {commit} out of git "
                         f"({detail.decode(errors='replace').strip()}); pass "
                         "--before-model-dir with that folder, or skip the design") from exc
    with tempfile.TemporaryFile() as fh:
        fh.write(archive.stdout)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(target, filter="data")
    return target / "service" / "default_model"


def small_model_dir(path: Path | None = None) -> Path:
    """The dsmi-small model as bundled at :data:`SMALL_MODEL_COMMIT` (out of git), or
    ``path``."""
    return before_model_dir(path, SMALL_MODEL_COMMIT)


def before_engine(model_id: str, path: Path | None = None):
    """The engine of the "before" design, as the service ran it then: the model of
    :func:`before_model_dir`, chunks of 256 items scored one at a time, ONNX Runtime's threads
    spinning. Exits with a message unless it is the model ``model_id`` (same weights)."""
    from service.engine import Engine

    engine = Engine(before_model_dir(path), providers=["cpu"], batch_size=256,
                    head_batch_size=256, head_threads=1, spin_wait=True)
    if engine.model_id != model_id:
        raise SystemExit(f"the 'before' model ({engine.model_id}) is not this model "
                         f"({model_id}): pass --before-model-dir")
    return engine
