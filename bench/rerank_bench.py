"""Two-stage retrieval against ``rerank``: accuracy on CUHK03 and query latency, in one run.

    .venv/bin/python -m bench.rerank_bench [--quick] [--reranks emb-only 10 20 50 100 all]
                                           [--gallery-size 10000] [--queries 30]
                                           [--out bench/results/rerank.json]
                                           [--figure docs/figures/rerank.png]

Stage one ranks the whole gallery by the cosine of the per-image embeddings (the
``embedding`` field of ``Engine.prepare_probe`` / ``prepare_gallery``); stage two re-scores
the best ``rerank`` of them with the DSMI pair head (``Engine.score``); the ranking is
:func:`model.retrieval.two_stage_order`. ``rerank`` 0 is the embeddings alone, ``all`` the
exhaustive design (every item scored by the head, the head alone decides).

- accuracy: the bundled model (``service/default_model``, ONNX Runtime on the CPU) on CUHK03
  labeled ``val`` (``$DSMI_DATA``, default ``../shared/data``): single-shot rank-1/5 and mAP
  (10 seeded trials of one gallery image per identity, as ``dsmi evaluate``, the two-stage
  ranking computed within each trial's gallery: see :func:`evaluate_two_stage`) and
  all-gallery rank-1 and mAP, each with its difference to exhaustive in points;
- latency: one probe against a gallery of ``--gallery-size`` prepared items (the real val
  gallery tiled, with a little noise so that no two items are equal): stage one (a
  matrix-vector product on the pre-normalised (N, 128) float32 embeddings and
  :func:`model.retrieval.shortlist`), stage two (the shortlisted items gathered by fancy
  indexing, ``Engine.score``, the shortlist re-sorted), median and p95 over ``--queries``
  probes after a warm-up; and exhaustive (``Engine.score`` over all N in ``batch_size``
  chunks, then the top ``--top-k``). The probe's own trunk and side are the same for every
  design, so they are timed once apart (``probe_side_ms`` in the JSON), not in the totals.

Prints a table, the recommended ``rerank`` (the smallest whose single-shot rank-1 and mAP are
both within ``--tolerance`` points of exhaustive), writes the JSON with every number, the
machine and the command, and a figure (accuracy and latency against ``rerank``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python bench/rerank_bench.py
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info, tile_gallery, write_results  # noqa: E402
from model.retrieval import l2_normalise, shortlist, two_stage_order  # noqa: E402

# Labels in the service's terms: there, rerank=0 asks for exhaustive scoring, and no query
# ranks by the embeddings alone; that row (rerank 0 here) is shown as "emb-only".
EXHAUSTIVE = "all"
EMBEDDING_ONLY = "emb-only"
DEFAULT_RERANKS = (EMBEDDING_ONLY, "10", "20", "30", "50", "100", "200", EXHAUSTIVE)
RANKS = (1, 5, 10, 20)

Rerank = int | None  # None: exhaustive


# ---------------------------------------------------------------------------------------------
# Ranking and accuracy (no engine: tests/bench/test_rerank_bench.py runs these on synthetic data)


def parse_rerank(value: str | int | None) -> Rerank:
    """``"all"`` (or None) -> None (exhaustive); ``"emb-only"`` -> 0 (stage one alone);
    anything else a non-negative int."""
    if value is None or (isinstance(value, str) and value.strip().lower() == EXHAUSTIVE):
        return None
    if isinstance(value, str) and value.strip().lower() == EMBEDDING_ONLY:
        return 0
    rerank = int(value)
    if rerank < 0:
        raise ValueError(f"rerank must be at least 0 or {EXHAUSTIVE!r}, not {value!r}")
    return rerank


def rerank_label(rerank: Rerank) -> str:
    return EXHAUSTIVE if rerank is None else EMBEDDING_ONLY if rerank == 0 else str(rerank)


def sort_reranks(reranks: Sequence[Rerank]) -> list[Rerank]:
    """Distinct values, increasing, exhaustive last."""
    ints = sorted({r for r in reranks if r is not None})
    return ints + ([None] if None in reranks else [])


def cosine_matrix(probe_embeddings: np.ndarray, gallery_embeddings: np.ndarray) -> np.ndarray:
    """``(Q, D)`` x ``(G, D)`` embeddings -> ``(Q, G)`` float32 cosines (stage one)."""
    return l2_normalise(probe_embeddings) @ l2_normalise(gallery_embeddings).T


def two_stage_distances(stage_one: np.ndarray, stage_two: np.ndarray,
                        rerank: Rerank) -> np.ndarray:
    """``(Q, G)`` stage-one and stage-two similarities -> ``(Q, G)`` distances whose
    ascending order is each query's two-stage ranking: an item's distance is its rank
    position (0 = best).

    Positions, not scores: the two stages' scores are on different scales, and a stable
    argsort of distinct integers gives back exactly :func:`two_stage_order`'s ranking.
    ``rerank`` None (exhaustive) is the head's order alone, equal scores in gallery order, as
    the service's exhaustive ranking and ``dsmi evaluate`` break ties;
    :func:`two_stage_order` with ``rerank >= G`` breaks them by stage one instead (the only
    difference between the two).
    """
    stage_one, stage_two = np.asarray(stage_one), np.asarray(stage_two)
    if stage_one.ndim != 2 or stage_two.shape != stage_one.shape:
        raise ValueError(f"stage_one and stage_two must both be (Q, G), not {stage_one.shape} "
                         f"and {stage_two.shape}")
    num_g = stage_one.shape[1]
    positions = np.arange(num_g, dtype=np.float64)
    dist = np.empty(stage_one.shape, dtype=np.float64)
    for q in range(stage_one.shape[0]):
        order = (shortlist(stage_two[q], num_g) if rerank is None
                 else two_stage_order(stage_one[q], stage_two[q], rerank))
        dist[q, order] = positions
    return dist


def _mean_figures(results: Sequence[dict]) -> dict:
    # As single_shot averages its trials: the CMC curve and the mAP, then read the ranks off
    # the mean curve.
    cmc = np.mean([r["cmc"] for r in results], axis=0)
    out = {f"rank{k}": float(cmc[k - 1]) for k in RANKS if k <= len(cmc)}
    out["mAP"] = float(np.mean([r["mAP"] for r in results]))
    out["cmc"] = cmc.tolist()
    return out


def evaluate_two_stage(stage_one: np.ndarray, stage_two: np.ndarray, rerank: Rerank,
                       queries: Sequence, gallery: Sequence, *, trials: int = 10,
                       seed: int = 0, max_rank: int = 20,
                       keep_pids: Sequence[int] = ()) -> dict:
    """Single-shot and all-gallery figures (fractions) of the two-stage ranking at ``rerank``.

    ``stage_one`` / ``stage_two``: ``(Q, G)`` similarities of ``queries`` x ``gallery``
    (ImageRecords). Returns ``{"single-shot": {rank1.., mAP, cmc, trials, gallery_size,
    per_trial}, "all-gallery": {rank1.., mAP, cmc, gallery_size}}``.

    Single-shot: :func:`training.metrics.single_shot` subsets the *columns* of one distance
    matrix, and a two-stage ranking is not column-subset invariant: the shortlist of the
    487-image gallery restricted to a drawn 100 is not the shortlist of those 100 (the top
    ``rerank`` of the full gallery holds fewer of them). So the trials are drawn here with the
    same generator and the same function as ``single_shot`` (``default_rng(seed)``, then
    :func:`training.metrics.draw_single_shot_gallery` once per trial: the same galleries as
    ``dsmi evaluate``), the two-stage distances computed within each drawn gallery, and each
    trial scored by :func:`training.report.evaluate_distances` on that gallery (its
    ``all-gallery`` protocol on the drawn gallery is exactly one single-shot trial); the
    trials are then averaged as ``single_shot`` averages them. ``tests/bench/test_rerank_bench.py``
    checks that this matches ``evaluate_distances``' own single-shot figures where the
    ranking does not depend on the gallery (rerank 0 and exhaustive).
    """
    from training.metrics import draw_single_shot_gallery
    from training.report import evaluate_distances

    stage_one, stage_two = np.asarray(stage_one), np.asarray(stage_two)
    g_pids = np.asarray([r.pid for r in gallery], dtype=np.int64)
    rng = np.random.default_rng(seed)
    per_trial, sizes = [], []
    for _ in range(int(trials)):
        cols = draw_single_shot_gallery(g_pids, rng, keep_pids)
        dist = two_stage_distances(stage_one[:, cols], stage_two[:, cols], rerank)
        report = evaluate_distances(dist, queries, [gallery[c] for c in cols],
                                    protocols=("all-gallery",), max_rank=max_rank)
        per_trial.append(report["results"][0])
        sizes.append(len(cols))
    single = {**_mean_figures(per_trial), "trials": int(trials), "seed": seed,
              "gallery_size": int(np.mean(sizes)),
              "per_trial": {"rank1": [r["rank1"] for r in per_trial],
                            "mAP": [r["mAP"] for r in per_trial]}}
    full = evaluate_distances(two_stage_distances(stage_one, stage_two, rerank), queries,
                              gallery, protocols=("all-gallery",), max_rank=max_rank)
    res = full["results"][0]
    whole = {**{k: res[k] for k in res if k.startswith("rank")}, "mAP": res["mAP"],
             "cmc": res["cmc"], "gallery_size": len(gallery)}
    return {"single-shot": single, "all-gallery": whole}


def add_deltas(rows: list[dict]) -> dict | None:
    """Each row's ``delta_points``: its figures minus exhaustive's, in points (needs an
    exhaustive row). Returns the exhaustive row."""
    exhaustive = next((r for r in rows if r["rerank"] is None), None)
    if exhaustive is None:
        return None
    for row in rows:
        row["delta_points"] = {
            f"{proto}_{key}": 100 * (row[proto][key] - exhaustive[proto][key])
            for proto in ("single-shot", "all-gallery") for key in ("rank1", "rank5", "mAP")}
    return exhaustive


def recommend(rows: Sequence[dict], tolerance: float = 0.5, one_sided: bool = False
              ) -> int | None:
    """The smallest ``rerank`` of at least 1 (the service cannot rank by the embeddings
    alone) whose single-shot rank-1 and mAP are both within ``tolerance`` points of
    exhaustive (``one_sided``: no more than ``tolerance`` below it, any amount above) -> that
    rerank, or None when none is (or no exhaustive row)."""
    for row in sorted((r for r in rows if r["rerank"]), key=lambda r: r["rerank"]):
        deltas = [row["delta_points"]["single-shot_rank1"],
                  row["delta_points"]["single-shot_mAP"]]
        # The deltas are differences of fractions times 100: a delta of exactly the
        # tolerance comes out a rounding error above it.
        slack = tolerance + 1e-9
        if all((d >= -slack) if one_sided else (abs(d) <= slack) for d in deltas):
            return row["rerank"]
    return None


# ---------------------------------------------------------------------------------------------
# Engine side


def load_images(engine, records) -> np.ndarray:
    """Records -> ``(B, 3, H, W)`` preprocessed images."""
    return np.stack([engine.preprocess(r.path) for r in records])


def prepare(engine, queries, gallery) -> tuple[dict, dict]:
    """Probe and gallery sides of the records: ``{field: (Q, ...)}``, ``{field: (G, ...)}``."""
    probes = engine.prepare_probe(engine.encode(load_images(engine, queries), "a"))
    sides = engine.prepare_gallery(engine.encode(load_images(engine, gallery), "b"))
    return probes, sides


def one_probe(probes: dict, q: int) -> dict:
    return {f: v[q:q + 1] for f, v in probes.items()}


def pair_matrix(engine, probes: dict, gallery: dict) -> np.ndarray:
    """``(Q, G)`` pair-head similarities, one ``Engine.score`` call per query."""
    num_q = len(probes["embedding"])
    return np.stack([engine.score(one_probe(probes, q), gallery) for q in range(num_q)])


def timed_query(engine, probe: dict, gallery: dict, unit_embeddings: np.ndarray,
                rerank: Rerank, top_k: int) -> tuple[float, float, np.ndarray]:
    """One query as the service would run it -> (stage-one s, stage-two s, top ``top_k``
    gallery indices). ``unit_embeddings``: ``l2_normalise(gallery["embedding"])``, computed
    once when the gallery is cached, so it is not timed."""
    t0 = time.perf_counter()
    if rerank is None:
        t1 = t0
        top = shortlist(engine.score(probe, gallery), top_k)
    else:
        stage_one = unit_embeddings @ l2_normalise(probe["embedding"])[0]
        # The stage-one best are needed beyond the shortlist when rerank < top_k: the rest
        # of the page comes in stage-one order.
        first = shortlist(stage_one, max(rerank, top_k))
        t1 = time.perf_counter()
        head = first[:rerank]
        if len(head):
            scores = engine.score(probe, {f: v[head] for f, v in gallery.items()})
            head = head[shortlist(scores, len(head))]
        top = np.concatenate([head, first[len(head):]])[:top_k]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, top


def check_fast_path(engine, probe: dict, gallery: dict, unit_embeddings: np.ndarray,
                    rerank: Rerank, top_k: int) -> None:
    """The timed path must return what :func:`two_stage_order` ranks first (it sorts only
    what it needs, so it is checked once here rather than trusted)."""
    _, _, top = timed_query(engine, probe, gallery, unit_embeddings, rerank, top_k)
    stage_one = unit_embeddings @ l2_normalise(probe["embedding"])[0]
    n = len(stage_one)
    # The head is run on exactly the batches the timed path gives it: scores of one item
    # may differ in the last bit between batch compositions, and near-ties would then swap.
    if rerank is None:
        expected = shortlist(engine.score(probe, gallery), top_k)
    else:
        stage_two = np.full(n, np.nan, np.float32)
        head = shortlist(stage_one, rerank)
        if len(head):
            stage_two[head] = engine.score(probe, {f: v[head] for f, v in gallery.items()})
        expected = two_stage_order(stage_one, stage_two, rerank)[:top_k]
    if not np.array_equal(top, expected):
        raise AssertionError(f"rerank {rerank_label(rerank)}: timed path ranks {top.tolist()}, "
                             f"two_stage_order {expected.tolist()}")


def _stats_ms(samples: Sequence[float]) -> dict:
    arr = 1e3 * np.asarray(samples)
    return {"median": float(np.median(arr)), "p95": float(np.percentile(arr, 95)),
            "min": float(arr.min())}


def measure_latency(engine, probes: dict, gallery: dict, reranks: Sequence[Rerank], *,
                    queries: int, warmup: int, top_k: int) -> dict:
    """Per rerank, stage-one / stage-two / total ms (median, p95, min) over ``queries``
    probes (rows of ``probes``, cycled), after ``warmup`` untimed probes through every
    design. The designs take turns on each probe, so that a busy spell on a shared machine
    falls on all of them rather than on one, and their order rotates from probe to probe:
    the design run just after exhaustive finds the caches flushed by its 10,000 items."""
    unit = l2_normalise(gallery["embedding"])
    num_probes = len(probes["embedding"])
    for rerank in reranks:
        check_fast_path(engine, one_probe(probes, 0), gallery, unit, rerank, top_k)
    samples = {rerank_label(r): {"stage1": [], "stage2": [], "total": []} for r in reranks}
    for k in range(warmup + queries):
        probe = one_probe(probes, k % num_probes)
        turn = k % len(reranks)
        for rerank in [*reranks[turn:], *reranks[:turn]]:
            s1, s2, _ = timed_query(engine, probe, gallery, unit, rerank, top_k)
            if k >= warmup:
                row = samples[rerank_label(rerank)]
                row["stage1"].append(s1)
                row["stage2"].append(s2)
                row["total"].append(s1 + s2)
    per_rerank = {label: {**{part: _stats_ms(v) for part, v in parts.items()},
                          "samples_ms": {part: [1e3 * s for s in v]
                                         for part, v in parts.items()}}
                  for label, parts in samples.items()}
    # Stage one again with no head call in between: ONNX Runtime's threads spin for a while
    # after a run, and BLAS splits the product over both cores, so on a busy machine it
    # waits for the core that is not free. ``einsum`` (no BLAS, one thread) is the same
    # product without that wait: together they say how much of stage one is interference.
    depth = max([top_k, *(r for r in reranks if r is not None)])
    products = {"matmul": lambda q: unit @ q,
                "einsum": lambda q: np.einsum("ij,j->i", unit, q)}
    alone: dict[str, list[float]] = {name: [] for name in products}
    for k in range(warmup + queries):
        query = l2_normalise(probes["embedding"][k % num_probes][None])[0]
        for name, product in products.items():
            t0 = time.perf_counter()
            shortlist(product(query), depth)
            if k >= warmup:
                alone[name].append(time.perf_counter() - t0)
    return {"per_rerank": per_rerank,
            "stage1_alone": {"shortlist": depth,
                             **{name: _stats_ms(v) for name, v in alone.items()}}}


def probe_side_ms(engine, images: np.ndarray, repeats: int) -> float:
    """Median ms of one probe image through the trunk (stream A) and its side."""
    times = []
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        engine.prepare_probe(engine.encode(images[k % len(images)][None], "a"))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


# ---------------------------------------------------------------------------------------------
# Output


def _pts(value: float) -> str:
    return f"{100 * value:6.2f}"


def print_table(report: dict) -> None:
    lat = report["latency"]
    n = lat["gallery_size"]
    print(f"\n{'rerank':>7} | {'single-shot':^13} | {'all-gallery':^13} | "
          f"{'vs exhaustive (SS)':^18} | {f'latency ms, gallery {n:,} (median/p95)':^44}")
    print(f"{'':>7} | {'R1':>6} {'mAP':>6} | {'R1':>6} {'mAP':>6} | {'dR1':>8} {'dmAP':>9} | "
          f"{'stage 1':>13} {'stage 2':>15} {'total':>14}")
    for row in report["rows"]:
        label = rerank_label(row["rerank"])
        ss, ag, d = row["single-shot"], row["all-gallery"], row.get("delta_points", {})
        t = lat["per_rerank"].get(label)
        timing = (f"{t['stage1']['median']:6.2f}/{t['stage1']['p95']:6.2f} "
                  f"{t['stage2']['median']:7.2f}/{t['stage2']['p95']:7.2f} "
                  f"{t['total']['median']:6.1f}/{t['total']['p95']:7.1f}" if t else "")
        delta = (f"{d['single-shot_rank1']:+8.2f} {d['single-shot_mAP']:+9.2f}" if d
                 else f"{'':>18}")
        print(f"{label:>7} | {_pts(ss['rank1'])} {_pts(ss['mAP'])} | {_pts(ag['rank1'])} "
              f"{_pts(ag['mAP'])} | {delta} | {timing}")
    acc = report["accuracy"]
    print(f"(CUHK03 labeled {acc['split']}: {acc['num_queries']} queries; single-shot: "
          f"{acc['trials']} trials of {acc['single_shot_gallery']} gallery images, the "
          f"two-stage ranking within each; all-gallery: {acc['num_gallery']} images; "
          f"deltas in points. Latency: {lat['queries']} probes after {lat['warmup']} warm-up, "
          f"top {lat['top_k']} returned; the probe's own trunk and side, "
          f"{lat['probe_side_ms']:.1f} ms, are common to all and not included)")
    alone = lat["stage1_alone"]
    print(f"stage one alone, no head call in between (shortlist of {alone['shortlist']}), "
          f"median/p95 ms: as above (BLAS matmul) {alone['matmul']['median']:.2f}/"
          f"{alone['matmul']['p95']:.2f}, single-threaded einsum "
          f"{alone['einsum']['median']:.2f}/{alone['einsum']['p95']:.2f}")


def plot(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["rerank"] is not None]
    exhaustive = next((r for r in report["rows"] if r["rerank"] is None), None)
    xs = np.array([r["rerank"] for r in rows], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.4), dpi=100)
    for key, name, colour in (("rank1", "rank-1", "tab:blue"), ("mAP", "mAP", "tab:orange")):
        left.plot(xs, [100 * r["single-shot"][key] for r in rows], marker="o", color=colour,
                  label=f"two-stage {name}")
        if exhaustive:
            left.axhline(100 * exhaustive["single-shot"][key], color=colour, linestyle="--",
                         label=f"exhaustive {name} ({100 * exhaustive['single-shot'][key]:.1f})")
    rec = report.get("recommended_rerank")
    if rec is not None:
        left.axvline(rec, color="grey", linestyle=":", label=f"recommended rerank {rec}")
    acc = report["accuracy"]
    left.set_xscale("symlog", linthresh=10)
    if len(xs):
        for ax in (left, right):
            ax.set_xlim(-1, 1.4 * xs.max())  # the end markers whole
    left.set_xlabel("rerank (items re-scored by the pair head; at 0: embeddings only)")
    left.set_ylabel("single-shot (%)")
    left.set_title(f"accuracy: CUHK03 labeled {acc['split']}, single-shot "
                   f"({acc['trials']} trials of {acc['single_shot_gallery']})", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="center right")

    lat = report["latency"]
    per = lat["per_rerank"]
    for part, name, style in (("total", "total (median)", "-o"),
                              ("stage1", "stage 1 (median)", "--s"),
                              ("stage2", "stage 2 (median)", "--^")):
        # Stage two at rerank 0 is no work at all: off a log axis.
        keep = [r for r in rows if part != "stage2" or r["rerank"] > 0]
        right.plot([r["rerank"] for r in keep],
                   [per[rerank_label(r["rerank"])][part]["median"] for r in keep], style,
                   label=name, markersize=4)
    right.fill_between(xs, [per[rerank_label(r["rerank"])]["total"]["median"] for r in rows],
                       [per[rerank_label(r["rerank"])]["total"]["p95"] for r in rows],
                       alpha=0.2, label="total, median to p95")
    if EXHAUSTIVE in per:
        ex = per[EXHAUSTIVE]["total"]
        right.axhline(ex["median"], color="black", linestyle="--",
                      label=f"exhaustive ({ex['median']:.0f} ms median)")
    right.set_xscale("symlog", linthresh=10)
    right.set_yscale("log")
    if rows:
        low = min(per[rerank_label(r["rerank"])]["stage1"]["median"] for r in rows)
        right.set_ylim(bottom=low / 30)  # room for the legend below the curves
    right.set_xlabel("rerank")
    right.set_ylabel("ms per query")
    right.set_title(f"latency: gallery of {lat['gallery_size']:,}, {report['providers'][0]}, "
                    f"{lat['queries']} probes", fontsize=9)
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Two-stage retrieval (embedding shortlist, pair-head re-score): "
                 f"{report['model']['variant']} ({report['model']['model_id']})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reranks", nargs="+", default=list(DEFAULT_RERANKS),
                   help=f"rerank values; '{EXHAUSTIVE}' is exhaustive (default: "
                        f"{' '.join(DEFAULT_RERANKS)})")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="exported model folder (default: the bundled model)")
    p.add_argument("--data", type=Path, default=None,
                   help="CUHK03 manifest (default $DSMI_DATA/cuhk03-labeled.csv, "
                        "$DSMI_DATA defaulting to ../shared/data)")
    p.add_argument("--split", default="val")
    p.add_argument("--trials", type=int, default=None, help="single-shot trials (10; quick 3)")
    p.add_argument("--seed", type=int, default=0, help="single-shot draws")
    p.add_argument("--max-queries", type=int, default=None,
                   help="accuracy on this many queries only, drawn with --seed "
                        "(default all; quick 100)")
    p.add_argument("--gallery-size", type=int, default=None,
                   help="latency gallery (default 10000; quick 2000)")
    p.add_argument("--queries", type=int, default=None,
                   help="timed probes per design (default 30; quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed probes (3; quick 1)")
    p.add_argument("--top-k", type=int, default=10,
                   help="matches a query returns (the service's default, 10)")
    p.add_argument("--batch", type=int, default=256, help="the engine's batch_size")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="points from exhaustive for the recommended rerank (0.5)")
    p.add_argument("--quick", action="store_true", help="a smaller run (see the defaults)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rerank.json")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "rerank.png")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("trials", 10, 3), ("gallery_size", 10_000, 2_000),
                              ("queries", 30, 10), ("warmup", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.max_queries is None and quick:
        args.max_queries = 100
    try:
        args.reranks = sort_reranks([parse_rerank(v) for v in args.reranks])
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from service.engine import Engine
    from service.settings import DEFAULT_MODEL_DIR
    from training.evaluate import load_eval_data

    started = time.perf_counter()
    info = machine_info()
    model_dir = args.model_dir or DEFAULT_MODEL_DIR
    data = args.data or Path(os.environ.get("DSMI_DATA", ROOT.parent / "shared" / "data")
                             ) / "cuhk03-labeled.csv"
    engine = Engine(model_dir, providers=["cpu"], batch_size=args.batch)
    print(f"model {engine.variant} ({engine.model_id}) from {model_dir}, ONNX Runtime "
          f"{', '.join(engine.providers)}")
    print(f"machine: {info['cpu']}, {info['cpus_usable']} CPUs usable, load average "
          f"{info['load_average']}")

    # -- accuracy
    evaldata = load_eval_data(data, None, args.split)
    queries, gallery = evaldata.queries, evaldata.gallery
    if args.max_queries and args.max_queries < len(queries):
        pick = np.sort(np.random.default_rng(args.seed).choice(len(queries), args.max_queries,
                                                                replace=False))
        queries = [queries[q] for q in pick]
    t0 = time.perf_counter()
    probes, sides = prepare(engine, queries, gallery)
    t_prepare = time.perf_counter() - t0
    stage_one = cosine_matrix(probes["embedding"], sides["embedding"])
    t0 = time.perf_counter()
    stage_two = pair_matrix(engine, probes, sides)
    t_pairs = time.perf_counter() - t0
    print(f"{len(queries)} queries x {len(gallery)} gallery images: sides {t_prepare:.1f} s, "
          f"pair head {t_pairs:.1f} s")
    t0 = time.perf_counter()
    rows = [{"rerank": r, "label": rerank_label(r),
             **evaluate_two_stage(stage_one, stage_two, r, queries, gallery,
                                  trials=args.trials, seed=args.seed,
                                  keep_pids=evaldata.keep_pids)}
            for r in args.reranks]
    t_metrics = time.perf_counter() - t0
    add_deltas(rows)
    has_exhaustive = any(r["rerank"] is None for r in rows)
    recommended = recommend(rows, args.tolerance) if has_exhaustive else None
    recommended_one_sided = (recommend(rows, args.tolerance, one_sided=True)
                             if has_exhaustive else None)

    # -- latency
    big = tile_gallery(sides, args.gallery_size, seed=args.seed)
    side_ms = probe_side_ms(engine, load_images(engine, queries[:5]), 10 if args.quick else 30)
    t0 = time.perf_counter()
    timings = measure_latency(engine, probes, big, args.reranks, queries=args.queries,
                              warmup=args.warmup, top_k=args.top_k)
    t_latency = time.perf_counter() - t0

    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.rerank_bench",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": args.quick,
        "machine": info,
        "model": {"dir": str(model_dir), "model_id": engine.model_id,
                  "variant": engine.variant, "batch_size": engine.batch_size},
        "providers": engine.providers,
        "accuracy": {"data": str(data), "dataset": evaldata.dataset, "split": evaldata.split,
                     "protocol": evaldata.protocol, "num_queries": len(queries),
                     "num_gallery": len(gallery),
                     "num_gallery_ids": len({r.pid for r in gallery}),
                     "single_shot_gallery": rows[0]["single-shot"]["gallery_size"],
                     "trials": args.trials, "seed": args.seed,
                     "units": "fractions in [0, 1]; delta_points in points (percent)",
                     "single_shot_note": "two-stage ranking computed within each drawn "
                                         "single-shot gallery (evaluate_two_stage)"},
        "rows": rows,
        "recommended_rerank": recommended,
        "recommended_rule": f"smallest rerank with single-shot rank-1 and mAP both within "
                            f"{args.tolerance} points of exhaustive",
        "recommended_rerank_one_sided": recommended_one_sided,
        "latency": {"gallery_size": args.gallery_size, "queries": args.queries,
                    "warmup": args.warmup, "top_k": args.top_k,
                    "gallery": f"the {len(gallery)} prepared val gallery items tiled, plus "
                               "Gaussian noise of 0.01 x each field's std",
                    "probe_side_ms": side_ms, **timings},
        "timing_s": {"sides": t_prepare, "pair_matrix": t_pairs, "metrics": t_metrics,
                     "latency": t_latency},
    }
    print_table(report)
    if recommended is not None:
        print(f"\nrecommended rerank: {recommended} (the smallest whose single-shot rank-1 and "
              f"mAP are both within {args.tolerance} points of exhaustive)")
    elif has_exhaustive:
        print(f"\nno rerank in {[rerank_label(r) for r in args.reranks]} is within "
              f"{args.tolerance} points of exhaustive: keep exhaustive")
    if recommended_one_sided != recommended:
        print(f"(allowing any gain and at most {args.tolerance} points of loss: "
              f"{recommended_one_sided})")
    report["run_time_s"] = time.perf_counter() - started
    if args.figure:
        plot(report, args.figure)
        print(f"wrote {args.figure}")
    write_results(args.out, report, f" (run time {report['run_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
