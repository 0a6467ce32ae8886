"""What the benchmarks share: the machine they ran on, and how their results are written."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

__all__ = ["machine_info", "write_results", "tile_gallery"]


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
