"""Inference benchmark: PyTorch eager vs ONNX Runtime (the service's engine) vs the naive design.

    .venv/bin/python -m bench.engine_bench [--variant dsmi-small] [--quick]
                                           [--out bench/results/engine-<variant>.json]

Measures, in one run on one machine:

- trunk images/s at batch 1 and 32; head pairs/s at N = 1000 (one probe against N prepared
  gallery items, in chunks of ``--batch`` items);
- query latency for galleries of 100, 1,000 and 10,000 items: encode the probe image, prepare
  its side, score it against the cached (prepared) gallery, streamed in chunks of ``--batch``;
- the same for the naive design, which runs the whole two-stream network (both trunks and the
  head) for every pair (``pair.onnx`` in ONNX Runtime); gallery sizes above ``--naive-max``
  are extrapolated from the largest measured one (the naive cost is linear in N) and marked;
- the head's FLOPs per pair, counted from the model's shapes and cross-checked with PyTorch's
  FLOP counter, against this machine's float32 GEMM rate (numpy and torch, measured here):
  the floor, and how far the measured head is from it;
- the effect of a float16 gallery cache on the scores, on real CUHK03 images when
  ``../shared/data`` (or ``$DSMI_DATA``) is there.

Prints a table and writes the JSON with the machine's description. Timings are the best of
repeated runs after a warm-up run (the least disturbed by other processes on a shared machine;
every sample and the medians are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # python bench/engine_bench.py
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info, write_results  # noqa: E402

GALLERY_SIZES = (100, 1_000, 10_000)
HEAD_N = 1_000


# ---------------------------------------------------------------------------------------------
# Timing and machine


def measure(fn: Callable[[], object], repeats: int, min_seconds: float) -> dict:
    """Run ``fn`` once to warm up, then at least ``repeats`` times and ``min_seconds``;
    return the median, min and all samples in seconds."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start < min_seconds
                                     and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "samples_s": samples}




def gemm_rate(n: int, repeats: int) -> dict:
    """float32 GEMM rate (GFLOP/s) of an n x n x n matmul, numpy (its BLAS) and torch."""
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    flops = 2 * n ** 3
    res = {"n": n}
    t = measure(lambda: a @ b, repeats, 0.5)
    res["numpy_gflops"] = flops / t["min_s"] / 1e9
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t = measure(lambda: ta @ tb, repeats, 0.5)
    res["torch_gflops"] = flops / t["min_s"] / 1e9
    res["best_gflops"] = max(res["numpy_gflops"], res["torch_gflops"])
    return res


# ---------------------------------------------------------------------------------------------
# FLOPs of the per-pair head


def head_flops(net) -> dict:
    """FLOPs per pair of ``net.score_features`` (the fused per-pair path), from the shapes.

    ``gemm``: 2 x multiply-adds of convolutions and matrix products (what a GEMM floor
    applies to); ``elementwise``: products, biases, ReLUs, pooling sums and the cosine.
    Per-call work that does not grow with the number of pairs (fusing weights) is left out.
    """
    from model.fusion import BilinearFusion, HadamardFusion, MultiplicativeGate
    from model.network import FCCNN
    from model.pooling import (
        GlobalAveragePooling,
        SpatialPyramidPooling,
        StackedConv,
        StackedIRNN,
        compose_pointwise,
    )

    if isinstance(net, FCCNN):
        f = net.fc.out_features
        return {"gemm": 0, "elementwise": 6 * f, "total": 6 * f,
                "parts": {"cosine": 6 * f}}
    k1, k2 = net.map_size
    cells = k1 * k2
    c = net.channels
    fusion, pooling = net.fusion, net.pooling
    parts: dict[str, tuple[int, int]] = {}  # name -> (gemm, elementwise)

    if isinstance(fusion, MultiplicativeGate):
        joint = fusion.U.out_channels
    elif isinstance(fusion, HadamardFusion):
        joint = c
    elif isinstance(fusion, BilinearFusion):
        joint = fusion.rank ** 2
    else:
        raise TypeError(f"no FLOP count for {type(fusion).__name__}")
    parts["product"] = (0, joint * cells)
    width = joint
    entry = compose_pointwise(fusion.projection, pooling.in_proj)
    if entry is not None:
        out, inp = entry[0].shape
        parts["entry pointwise map"] = (2 * out * inp * cells, out * cells)
        width = out

    if isinstance(pooling, StackedIRNN):
        h = pooling.layers[0].recurrence.hidden
        steps = 2 * (k2 - 1) * k1 + 2 * (k1 - 1) * k2  # matrix-vector steps, four sweeps
        layers = len(pooling.layers)
        # each step: W h (2h^2) + x (h) then ReLU (h); the first cell of a sweep: ReLU only
        parts["recurrences"] = (layers * steps * 2 * h * h, layers * 4 * cells * 2 * h)
        if layers > 1:
            parts["fused convs between layers"] = ((layers - 1) * 2 * 4 * h * h * cells,
                                                   (layers - 1) * h * cells)
        width = 4 * h
    elif isinstance(pooling, SpatialPyramidPooling):
        parts["pyramid averages"] = (0, len(pooling.levels) * width * cells)
        width = pooling.core_channels
    elif isinstance(pooling, GlobalAveragePooling):
        parts["global average"] = (0, width * cells)
    elif isinstance(pooling, StackedConv):
        conv1, _, conv2 = pooling.convs
        g = 2 * 9 * cells * (conv1.in_channels * conv1.out_channels
                             + conv2.in_channels * conv2.out_channels)
        parts["3x3 convs"] = (g, 2 * conv1.out_channels * cells + conv2.out_channels * cells)
        width = conv2.out_channels
    else:
        raise TypeError(f"no FLOP count for {type(pooling).__name__}")

    weights = net.head_weights()
    tail_w, _ = weights.tail
    if not weights.tail_fused and pooling.out_proj is not None:
        o = pooling.out_proj
        parts["output conv"] = (2 * o.in_channels * o.out_channels * cells,
                                o.out_channels * cells)
    fc_out, fc_in = tail_w.shape
    parts["tail (FC of the joint map)"] = (2 * fc_out * fc_in, fc_out)
    parts["cosine"] = (0, 2 * fc_out + 6 * fc_out)  # x = e - j twice; 3 dot products
    gemm = sum(g for g, _ in parts.values())
    elem = sum(e for _, e in parts.values())
    return {"gemm": gemm, "elementwise": elem, "total": gemm + elem,
            "parts": {k: g + e for k, (g, e) in parts.items()}}


def profiler_gemm_flops(net) -> float:
    """PyTorch's FLOP counter on ``score_features``: per-pair FLOPs, as the difference of a
    16-pair and an 8-pair call (per-call work cancels out)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        maps = net.encode(torch.zeros(1, 3, *net.input_size))
        probe = net.prepare_probe(maps)
        weights = net.head_weights()
        counts = []
        for n in (8, 16):
            gallery = net.prepare_gallery(maps.expand(n, -1, -1, -1))
            with FlopCounterMode(display=False) as counter:
                net.score_features(probe, gallery, weights)
            counts.append(counter.get_total_flops())
    return (counts[1] - counts[0]) / 8


def trunk_flops(net) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.encode(torch.zeros(1, 3, *net.input_size))
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# The three designs


class TorchEager:
    """The split design in PyTorch eager mode (what training's inference code does)."""

    name = "PyTorch eager"

    def __init__(self, net, device: str) -> None:
        import copy

        import torch

        # A copy on the device: Module.to moves in place, and the caller's network is used
        # afterwards on the CPU (FLOP counts), which crashed with CUDA weights and CPU inputs.
        self.torch, self.device = torch, device
        self.net = copy.deepcopy(net).to(device).eval()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def encode(self, images: np.ndarray, stream: str = "a"):
        with self.torch.inference_mode():
            out = self.net.encode(self.torch.from_numpy(images).to(self.device), stream)
        self._sync()
        return out

    def prepare_probe(self, maps):
        with self.torch.inference_mode():
            return self.net.prepare_probe(maps)

    def prepare_gallery(self, maps):
        with self.torch.inference_mode():
            return self.net.prepare_gallery(maps)

    def tile(self, gallery, n: int):
        reps = -(-n // len(gallery[0]))
        return type(gallery)(*(t.repeat(reps, *[1] * (t.dim() - 1))[:n] for t in gallery))

    def score(self, probe, gallery_chunks) -> np.ndarray:
        weights = self.net.head_weights()
        parts = []
        with self.torch.inference_mode():
            for chunk in gallery_chunks:
                parts.append(self.net.score_features(probe, chunk, weights))
            out = self.torch.cat(parts).cpu().numpy()
        self._sync()
        return out

    def chunks(self, gallery, n: int, batch: int):
        """The gallery cache, streamed: ``n`` items in chunks of ``batch`` (a prepared chunk
        reused, so a 10,000-item gallery does not need 10,000 items' memory)."""
        chunk = self.tile(gallery, batch)
        for k in range(0, n, batch):
            yield type(chunk)(*(t[:min(batch, n - k)] for t in chunk))


class OnnxRuntime:
    """The split design in ONNX Runtime: the service's engine."""

    name = "ONNX Runtime"

    def __init__(self, engine) -> None:
        self.engine = engine

    def encode(self, images: np.ndarray, stream: str = "a") -> np.ndarray:
        return self.engine.encode(images, stream)

    def prepare_probe(self, maps):
        return self.engine.prepare_probe(maps)

    def prepare_gallery(self, maps):
        return self.engine.prepare_gallery(maps)

    def tile(self, gallery, n: int):
        reps = -(-n // len(next(iter(gallery.values()))))
        return {f: np.concatenate([v] * reps)[:n] for f, v in gallery.items()}

    def score(self, probe, gallery_chunks) -> np.ndarray:
        return self.engine.score(probe, gallery_chunks)

    def chunks(self, gallery, n: int, batch: int):
        chunk = self.tile(gallery, batch)
        for k in range(0, n, batch):
            yield {f: v[:min(batch, n - k)] for f, v in chunk.items()}


class OnnxRuntimePlaced(OnnxRuntime):
    """The service's engine with the gallery placed where the head runs (GPU memory under
    CUDA) once, and scored by I/O binding: what a resident gallery does with
    ``place_galleries`` (the default under CUDA). Placement is outside the timed calls."""

    name = "ORT, placed"

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self._placed: dict[tuple[int, int], list] = {}

    def score(self, probe, gallery_chunks) -> np.ndarray:
        return self.engine.score_placed(probe, gallery_chunks)

    def chunks(self, gallery, n: int, batch: int):
        key = (id(gallery), n)
        if key not in self._placed:  # the first (untimed-best) call places the gallery
            tiled = self.tile(gallery, n)
            self._placed[key] = self.engine.place(tiled, 0, n)
        return self._placed[key]


class NaiveOnnx:
    """The naive design: the whole two-stream network for every (probe, gallery image) pair,
    nothing cached (``pair.onnx``: both trunks, both sides and the head per pair)."""

    name = "naive (ORT)"

    def __init__(self, path: Path, providers: list[str], image_batch: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.image_batch = image_batch

    def query(self, probe_image: np.ndarray, gallery_images: np.ndarray, n: int) -> np.ndarray:
        """Scores of one probe image against ``n`` gallery images (``gallery_images``
        reused cyclically: the cost does not depend on the pixels)."""
        parts = []
        for k in range(0, n, self.image_batch):
            b = min(self.image_batch, n - k)
            gallery = gallery_images[np.arange(k, k + b) % len(gallery_images)]
            probe = np.ascontiguousarray(np.broadcast_to(probe_image, gallery.shape))
            parts.append(self.session.run(None, {"images_a": probe, "images_b": gallery})[0])
        return np.concatenate(parts)


def head_profile(model_dir: Path, providers: list[str], n: int, runs: int = 5) -> dict:
    """Where ONNX Runtime spends the head's time: share of kernel time per operator type,
    from its profiler, for calls of ``n`` gallery items."""
    import onnxruntime as ort

    manifest = json.loads((model_dir / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = str(model_dir.parent / "head_profile")
    session = ort.InferenceSession(str(model_dir / "head.onnx"), options, providers=providers)
    rng = np.random.default_rng(0)
    feed = {}
    for f, shape in manifest["probe_fields"].items():
        feed[f"probe_{f}"] = rng.random((1, *shape), np.float32)
        feed[f"gallery_{f}"] = rng.random((n, *shape), np.float32)
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    total = sum(per_op.values()) or 1.0
    return {"n": n, "share_by_op": {op: t / total for op, t in
                                    sorted(per_op.items(), key=lambda kv: -kv[1])}}


# ---------------------------------------------------------------------------------------------
# Real images: float16 cache effect


def _real_records(count: int):
    from training.data import read_manifest

    data = Path(os.environ.get("DSMI_DATA", ROOT.parent / "shared" / "data"))
    csv = data / "cuhk03-labeled.csv"
    if not csv.is_file():
        return None
    records = [r for r in read_manifest(csv, check_files=False) if r.split == "val"]
    return records[:count]


def calibrate_batchnorm(net, images) -> None:
    """Batch-norm statistics from real images: a random model then scores with a spread like
    a trained model's (with the initial statistics every score is within 1e-3 of 1)."""
    import torch

    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        net.encode(torch.from_numpy(images))
    net.eval()


def float16_effect(model_dir: Path, providers: list[str], images: np.ndarray,
                   probes: int) -> dict:
    """Each of ``probes`` images against all the others, float32 vs float16 cache."""
    from service.engine import Engine

    f32 = Engine(model_dir, providers=providers, warmup=False)
    f16 = Engine(model_dir, providers=providers, cache_dtype="float16", warmup=False)
    maps_a, maps_b = f32.encode(images, "a"), f32.encode(images, "b")
    g32, g16 = f32.prepare_gallery(maps_b), f16.prepare_gallery(maps_b)
    diffs, same_top10, spreads = [], 0, []
    for q in range(probes):
        keep = np.arange(len(images)) != q
        probe = f32.prepare_probe(maps_a[q:q + 1])
        s32 = f32.score(probe, {f: v[keep] for f, v in g32.items()})
        s16 = f16.score(probe, {f: v[keep] for f, v in g16.items()})
        diffs.append(float(np.abs(s16 - s32).max()))
        spreads.append(float(s32.std()))
        same_top10 += list(np.argsort(-s16)[:10]) == list(np.argsort(-s32)[:10])
    return {"probes": probes, "gallery": len(images) - 1, "max_abs_diff": max(diffs),
            "mean_max_abs_diff": float(np.mean(diffs)), "score_std": float(np.mean(spreads)),
            "top10_identical": same_top10,
            "bytes_per_item_float32": int(sum(np.prod(s) for s, _ in f32.gallery_spec.values())
                                          * 4),
            "bytes_per_item_float16": int(sum(np.prod(s) for s, _ in f16.gallery_spec.values())
                                          * 2)}


# ---------------------------------------------------------------------------------------------
# The run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="dsmi-small")
    p.add_argument("--checkpoint", type=Path, help="benchmark a trained checkpoint instead "
                                                   "of a randomly initialised variant")
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes")
    p.add_argument("--out", type=Path, help="JSON output "
                                            "(default bench/results/engine-<variant>.json)")
    p.add_argument("--batch", type=int, default=256, help="gallery items per head call")
    p.add_argument("--image-batch", type=int, default=32, help="images per trunk call")
    p.add_argument("--providers", default=None,
                   help="ONNX Runtime providers, comma-separated (default: the engine's "
                        "automatic choice, CUDA when usable, else CPU)")
    p.add_argument("--naive-max", type=int, default=1_000,
                   help="largest gallery the naive design is run on; larger ones are "
                        "extrapolated linearly (default 1000)")
    p.add_argument("--sizes", default=None,
                   help="gallery sizes, comma-separated (default 100,1000,10000)")
    p.add_argument("--head-n", type=int, default=HEAD_N, help="pairs per head measurement")
    p.add_argument("--no-real", action="store_true",
                   help="skip the real images (batch-norm calibration, float16 check)")
    p.add_argument("--trunk-batches", default="1,32",
                   help="trunk batch sizes, comma-separated (default 1,32)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from model import build_model
    from model.export import export_model
    from service.engine import Engine

    repeats, min_s = (3, 0.5) if args.quick else (7, 2.0)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else GALLERY_SIZES
    if args.checkpoint:
        from model.checkpoint import load_checkpoint
        net, _ = load_checkpoint(args.checkpoint)
        source = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(0)
        net = build_model(args.variant)
        source = "random init (seed 0)"
    net.eval()
    variant = net.variant
    out_path = args.out or ROOT / "bench" / "results" / f"engine-{variant}.json"

    records = None if args.no_real else _real_records(64 if args.quick else 101)
    real = None
    if records:
        from model.preprocess import load_image_tensor
        real = np.stack([load_image_tensor(r.path, net.input_size) for r in records])
        if not args.checkpoint:
            calibrate_batchnorm(net, real)
            source += f", batch-norm statistics from {len(real)} CUHK03 val images"

    info = machine_info()
    gemm_start = gemm_rate(2048, repeats)
    print(f"variant {variant} ({source}), input {net.input_size[0]}x{net.input_size[1]}")
    print(f"machine: {info['cpu']}, {info['cpus_usable']} CPUs usable, load average "
          f"{info['load_average']}, GPU: {info['gpu']}")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, naive_dir = Path(tmp) / "model", Path(tmp) / "naive"
        export_model(net, model_dir)                    # what the service loads
        export_model(net, naive_dir, pair_graph=True)   # plus the whole network per pair
        providers = args.providers.split(",") if args.providers else None
        engine = Engine(model_dir, providers=providers, batch_size=args.batch,
                        image_batch_size=args.image_batch)
        print(f"ONNX Runtime providers in use: {', '.join(engine.providers)}")
        device = "cuda" if (engine.providers[0] == "CUDAExecutionProvider"
                            and torch.cuda.is_available()) else "cpu"
        designs = {"torch": TorchEager(net, device), "ort": OnnxRuntime(engine),
                   "ort_placed": OnnxRuntimePlaced(engine)}
        naive = NaiveOnnx(naive_dir / "pair.onnx", engine.providers, args.image_batch)
        results = run_measurements(args, designs, naive, net, sizes, repeats, min_s)
        results["head_profile"] = head_profile(model_dir, engine.providers, args.batch)
        results["float16_cache"] = (float16_effect(model_dir, engine.providers, real,
                                                   probes=5 if args.quick else 20)
                                    if real is not None else None)
        results["export_bytes"] = {p.name: p.stat().st_size for p in model_dir.iterdir()
                                   if p.suffix in (".onnx", ".bin", ".json")}

    flops = head_flops(net)
    flops["profiler_gemm"] = profiler_gemm_flops(net)
    # Measured at the start and at the end of the run, the best kept: on a shared machine one
    # of the two may fall in a busy spell, and the floor is about what the cores can do.
    gemm_end = gemm_rate(2048, repeats)
    gemm = dict(max(gemm_start, gemm_end, key=lambda g: g["best_gflops"]))
    gemm["start_gflops"], gemm["end_gflops"] = (gemm_start["best_gflops"],
                                                gemm_end["best_gflops"])
    floor_pps = gemm["best_gflops"] * 1e9 / flops["total"]
    head_ort = results["head_pairs_per_s"]["ort"]
    report = {
        "variant": variant, "source": source, "input_size": list(net.input_size),
        "quick": args.quick, "batch": args.batch, "image_batch": args.image_batch,
        "head_n": args.head_n,
        "machine": info, "onnxruntime_providers": engine.providers, "torch_device": device,
        "command": " ".join([Path(sys.executable).name, "-m", "bench.engine_bench",
                             *(argv if argv is not None else sys.argv[1:])]),
        **results,
        "head_flops_per_pair": flops,
        "trunk_flops_per_image": trunk_flops(net.cpu()),
        "gemm_float32": gemm,
        "head_floor": {"pairs_per_s": floor_pps, "ort_fraction_of_floor": head_ort / floor_pps,
                       "ort_times_slower_than_floor": floor_pps / head_ort},
    }
    report["machine"]["load_average_end"] = (list(os.getloadavg())
                                             if hasattr(os, "getloadavg") else None)
    print_table(report)
    write_results(out_path, report)
    return 0


def run_measurements(args, designs, naive, net, sizes, repeats, min_s) -> dict:
    rng = np.random.default_rng(0)
    h, w = net.input_size
    batches = [int(b) for b in args.trunk_batches.split(",")]
    images = rng.standard_normal((max(batches), 3, h, w)).astype(np.float32)
    res: dict = {"trunk_images_per_s": {}, "head_pairs_per_s": {}, "query_latency_s": {},
                 "timings": {}}
    for batch in batches:
        row = {}
        for key, d in designs.items():
            t = measure(lambda d=d, b=batch: d.encode(images[:b], "b"), repeats, min_s)
            row[key] = batch / t["min_s"]
            res["timings"][f"trunk_b{batch}_{key}"] = t
        row["naive"] = row["ort"]  # the naive design runs the same trunk
        res["trunk_images_per_s"][str(batch)] = row

    prepared = {}
    for key, d in designs.items():
        maps = d.encode(images, "b")
        prepared[key] = (d.prepare_probe(d.encode(images[:1], "a")), d.prepare_gallery(maps))
    head = {}
    for key, d in designs.items():
        probe, gallery = prepared[key]
        t = measure(lambda d=d, p=probe, g=gallery: d.score(p, d.chunks(g, args.head_n,
                                                                         args.batch)),
                    repeats, min_s)
        head[key] = args.head_n / t["min_s"]
        res["timings"][f"head_n{args.head_n}_{key}"] = t
    n_naive = min(args.head_n, args.naive_max)
    t = measure(lambda: naive.query(images[:1], images, n_naive), max(1, repeats // 2), 0)
    head["naive"] = n_naive / t["min_s"]
    res["timings"][f"naive_pairs_n{n_naive}"] = t
    res["head_pairs_per_s"] = head

    for n in sizes:
        row, extrapolated = {}, False
        for key, d in designs.items():
            _, gallery = prepared[key]

            def query(d=d, g=gallery, n=n):
                probe = d.prepare_probe(d.encode(images[:1], "a"))
                return d.score(probe, d.chunks(g, n, args.batch))

            t = measure(query, repeats if n <= 1000 else max(2, repeats // 2), min_s)
            row[key] = t["min_s"]
            res["timings"][f"query_n{n}_{key}"] = t
        if n <= args.naive_max:
            t = measure(lambda n=n: naive.query(images[:1], images, n),
                        max(1, repeats // 2) if n > 100 else repeats, 0)
            row["naive"] = t["min_s"]
            res["timings"][f"query_n{n}_naive"] = t
        else:
            measured = [m for m in sizes if m <= args.naive_max]
            base = max(measured) if measured else None
            if base is None:
                row["naive"] = n / head["naive"]
            else:
                row["naive"] = res["query_latency_s"][str(base)]["naive"] * n / base
            extrapolated = True
        row["naive_extrapolated"] = extrapolated
        res["query_latency_s"][str(n)] = row
    return res


def _fmt(value: float, kind: str) -> str:
    if kind == "ms":
        return f"{value * 1e3:,.1f}" if value < 10 else f"{value:,.1f} s"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def print_table(r: dict) -> None:
    cols = ("PyTorch eager", "ONNX Runtime", "naive (ORT)", "ORT/PyTorch", "naive/ORT")
    print(f"\n{'':34}" + "".join(f"{c:>15}" for c in cols))

    def line(label, row, kind, higher_better):
        torch_v, ort_v, naive_v = row["torch"], row["ort"], row["naive"]
        speed = torch_v and ort_v and (ort_v / torch_v if higher_better else torch_v / ort_v)
        gain = ort_v / naive_v if higher_better else naive_v / ort_v
        mark = "*" if row.get("naive_extrapolated") else ""
        print(f"{label:34}{_fmt(torch_v, kind):>15}{_fmt(ort_v, kind):>15}"
              f"{_fmt(naive_v, kind) + mark:>15}{speed:>14.2f}x{gain:>14.1f}x")

    for b, row in r["trunk_images_per_s"].items():
        line(f"trunk images/s, batch {b}", row, "rate", True)
    line(f"head pairs/s, N={r['head_n']:,}", r["head_pairs_per_s"], "rate", True)
    placed = r["head_pairs_per_s"].get("ort_placed")
    if placed:
        print(f"{'  ORT with the gallery placed':34}{'':>15}{_fmt(placed, 'rate'):>15}"
              f"{'':>15}{placed / r['head_pairs_per_s']['ort']:>14.2f}x (placed / copied)")
    for n, row in r["query_latency_s"].items():
        line(f"query latency ms, gallery {int(n):,}", row, "ms", False)
    print("(ratios: how many times faster ONNX Runtime is than PyTorch eager, and than the "
          "naive design; * extrapolated linearly from the largest measured gallery)")
    f = r["head_flops_per_pair"]
    g = r["gemm_float32"]
    fl = r["head_floor"]
    print(f"\nhead FLOPs per pair: {f['total'] / 1e6:.3f} M (GEMM {f['gemm'] / 1e6:.3f} M, "
          f"elementwise {f['elementwise'] / 1e6:.3f} M; PyTorch's FLOP counter: GEMM "
          f"{f['profiler_gemm'] / 1e6:.3f} M)")
    for part, v in f["parts"].items():
        print(f"  {part:<32}{v / 1e6:10.3f} M")
    print(f"trunk FLOPs per image: {r['trunk_flops_per_image'] / 1e9:.3f} G")
    print(f"float32 GEMM rate, {g['n']}^3: numpy {g['numpy_gflops']:.1f} GFLOP/s, torch "
          f"{g['torch_gflops']:.1f} GFLOP/s (best of the start and the end of the run: "
          f"{g['start_gflops']:.1f} and {g['end_gflops']:.1f})")
    print(f"head floor at {g['best_gflops']:.1f} GFLOP/s: {fl['pairs_per_s']:,.0f} pairs/s; "
          f"ONNX Runtime reaches {r['head_pairs_per_s']['ort']:,.0f} pairs/s = "
          f"{100 * fl['ort_fraction_of_floor']:.1f}% of it "
          f"({fl['ort_times_slower_than_floor']:.1f}x from the floor)")
    if fl["ort_fraction_of_floor"] > 1:
        print("  (above the floor: the GEMM rate was measured while other processes ran)")
    prof = r.get("head_profile")
    if prof:
        top = list(prof["share_by_op"].items())[:5]
        print(f"head kernel time by operator (ONNX Runtime profiler, {prof['n']} items per "
              "call): " + ", ".join(f"{op} {100 * v:.0f}%" for op, v in top))
    f16 = r.get("float16_cache")
    if f16:
        print(f"float16 gallery cache ({f16['bytes_per_item_float16']:,} instead of "
              f"{f16['bytes_per_item_float32']:,} bytes per item): max |score difference| "
              f"{f16['max_abs_diff']:.2e} over {f16['probes']} CUHK03 probes x "
              f"{f16['gallery']} gallery images (score std {f16['score_std']:.3f}); top-10 "
              f"identical for {f16['top10_identical']}/{f16['probes']} probes")
    sizes = r.get("export_bytes", {})
    listing = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sizes.items()))
    print(f"exported folder (as the service loads it): {listing}; total "
          f"{sum(sizes.values()) / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
