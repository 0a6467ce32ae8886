"""A warm query's cost against the number of other resident galleries, in one run.

One worker's :class:`service.store.resident.ResidentCache` holds 1 gallery, then ``--galleries``
(default 5,000) small ones; the queried gallery is warm (resident, unchanged). Each query is
:meth:`service.ranking.GalleryRanker.rank_encoded`, what the query route's ranker calls: the
cache check and bookkeeping, then the two stages. Compared with the design before (the eviction
check summed every resident gallery's size under the cache's lock on each query), in the same
run.

    .venv/bin/python -m bench.resident_bench          # bench/results/resident.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, write_results
from service.engine import Engine
from service.metrics import ServiceMetrics
from service.ranking import CameraFilter, GalleryRanker
from service.settings import DEFAULT_MODEL_DIR
from service.store import GalleryItem, MemoryGalleryStore, NewItem, new_image_id
from service.store.resident import ResidentCache

ROOT = Path(__file__).resolve().parents[1]


class BeforeCache(ResidentCache):
    """The eviction check as it was: every resident gallery's bytes summed on each query."""

    def _evict(self, keep: str) -> None:
        with self._lock:
            total = sum(g.nbytes for g in self._galleries.values())
            for name in list(self._galleries):
                if total <= self.max_bytes:
                    break
                if name != keep:
                    total -= self._galleries[name].nbytes
                    self._forget(name)


def fill(store, engine: Engine, name: str, n: int, rng) -> None:
    items = []
    for k in range(n):
        tensors = {f: rng.normal(size=shape).astype(np.float32)
                   for f, (shape, _) in engine.gallery_spec.items()}
        items.append(NewItem(GalleryItem(new_image_id(), f"p{k}", "1"),
                             engine.codec.encode(tensors)))
    store.add_items(name, items)


def warm_p50(engine, store, cache, probe, queries: int) -> float:
    ranker = GalleryRanker(engine, store, ServiceMetrics(), cache=cache)
    for _ in range(3):
        ranker.rank_encoded("queried", probe, 10, CameraFilter.of(None), rerank=100)
    times = []
    for _ in range(queries):
        t0 = time.perf_counter()
        ranker.rank_encoded("queried", probe, 10, CameraFilter.of(None), rerank=100)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--galleries", type=int, default=5000)
    p.add_argument("--items", type=int, default=200, help="items of the queried gallery")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "resident.json")
    args = p.parse_args(argv)
    engine = Engine(args.model_dir, providers=["cpu"])
    rng = np.random.default_rng(0)
    store = MemoryGalleryStore()
    fill(store, engine, "queried", args.items, rng)
    for g in range(args.galleries):
        fill(store, engine, f"other-{g}", 2, rng)
    probe = engine.prepare_probe(engine.encode(
        rng.normal(size=(1, 3, *engine.input_size)).astype(np.float32), "a"))
    rows = {}
    for design, cls in (("before", BeforeCache), ("now", ResidentCache)):
        alone = cls(engine.codec, 1 << 40, "embedding")
        crowded = cls(engine.codec, 1 << 40, "embedding")
        for g in range(args.galleries):
            crowded.view(store, f"other-{g}")
        p_alone = warm_p50(engine, store, alone, probe, args.queries)
        p_crowded = warm_p50(engine, store, crowded, probe, args.queries)
        rows[design] = {"p50_ms_1": p_alone, "p50_ms_many": p_crowded,
                        "ratio": p_crowded / p_alone}
        print(f"{design:<7} warm query p50: {p_alone:7.2f} ms with 1 resident gallery, "
              f"{p_crowded:7.2f} ms with {args.galleries + 1:,}: ratio {p_crowded / p_alone:.2f}",
              flush=True)
    write_results(args.out, {"machine": machine_info(), "galleries": args.galleries,
                             "items": args.items, "queries": args.queries, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
