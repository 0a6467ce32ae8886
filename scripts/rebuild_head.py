"""Rebuild the head graph of a model folder exported before the channels-last head.

The bundled model (``service/default_model``) was exported from a checkpoint that is not kept
(its training run lived in a session's ``runs/``). Its trunk, probe and gallery graphs are
unchanged by the channels-last head, but its ``head.onnx`` is the old, slower graph. This
script reads the weights that graph holds (the fused entry map, the recurrent matrices, the
two convolutions between the IRNN layers, the fused tail, and the FC from ``probe.onnx``),
puts them into a network of the folder's variant, traces the head again with today's
``score_features``, and writes a new folder: the old graphs, the new head, one
``weights.bin``, the manifest with the same model id (the function is the same; caches stay
valid). It refuses to write unless the new head scores real images as the old one does.

Usage::

    .venv/bin/python scripts/rebuild_head.py service/default_model /tmp/rebuilt \\
        --images ../shared/data/cuhk03-labeled/val
    # then, after reading its report: replace service/default_model with /tmp/rebuilt

Only for folders whose head is the gate + stacked IRNN with a fused tail (``dsmi-small``);
anything else is refused with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from model.export import _export_graph, _externalise, _Head
from model.factory import build_model
from model.formats import ExportManifest
from model.network import HeadWeights, StreamFeatures
from model.pooling import StackedIRNN
from service.engine import Engine


def _initialisers(path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(str(path))  # external data read from the folder
    return model, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def rebuild(src: Path, dst: Path, images: list[Path]) -> float:
    manifest = ExportManifest.read(src)
    net = build_model(**manifest.build_args).eval()
    pooling = net.pooling
    if not isinstance(pooling, StackedIRNN) or not net._fuse_tail:
        sys.exit(f"{src}: only a gate + stacked IRNN head with a fused tail is handled")
    _, head = _initialisers(src / manifest.graphs["head"].file)
    _, probe = _initialisers(src / manifest.graphs["probe"].file)

    # The old graph's recurrent matrices, in the order it was traced: per layer the
    # left/right pair, then the top/bottom pair, each stored transposed (h @ W^T).
    recurrent = [v for k, v in head.items() if k.startswith("onnx::MatMul_")]
    if len(recurrent) != 2 * len(pooling.layers):
        sys.exit(f"{src}: expected {2 * len(pooling.layers)} recurrent pairs, "
                 f"found {len(recurrent)}")
    entry = [v for k, v in head.items() if k.startswith("onnx::Conv_")]
    if len(entry) != 1:
        sys.exit(f"{src}: expected one fused entry convolution, found {len(entry)}")
    state = {"fc.weight": probe["net.fc.weight"], "fc.bias": probe["net.fc.bias"]}
    for k in range(len(pooling.layers)):
        pair = np.concatenate([recurrent[2 * k], recurrent[2 * k + 1]])  # (4, h, h), W^T
        state[f"pooling.layers.{k}.recurrence.weight"] = pair.transpose(0, 2, 1)
    for name in head:
        if name.startswith("net.pooling."):
            state[name[len("net."):]] = head[name]
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                        strict=False)

    # The fused entry and tail, as the old graph holds them; its tail columns were in
    # (core channel, cell) order, today's head wants (cell, core channel).
    tail_w = torch.from_numpy(np.array(head["head_weight_2"]))
    f, c = tail_w.shape[0], pooling.core_channels
    tail_w = tail_w.view(f, c, -1).transpose(1, 2).reshape(f, -1)
    weights = HeadWeights((torch.from_numpy(entry[0].reshape(entry[0].shape[0], -1).copy()),
                           torch.from_numpy(np.array(head["head_weight_1"]))),
                          (tail_w, torch.from_numpy(np.array(head["head_weight_3"]))), True)
    module = _Head(net, StreamFeatures)
    for k, leaf in enumerate([*weights.entry, *weights.tail]):
        getattr(module, f"head_weight_{k}").copy_(leaf)

    staging = Path(tempfile.mkdtemp(prefix=".rebuild.", dir=dst.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a service's own user
    try:
        fields = manifest.fields
        spec = manifest.probe_fields
        args = tuple(torch.zeros(1, *spec[f]) for f in fields) + tuple(
            torch.zeros(2, *manifest.gallery_fields[f]) for f in fields)
        inputs = {f"probe_{f}": None for f in fields}
        inputs.update({f"gallery_{f}": 0 for f in fields})
        models = {}
        for key, graph in manifest.graphs.items():
            if graph.file in models:
                continue
            if key == "head":
                with torch.no_grad():
                    models[graph.file] = _export_graph(
                        module, args, staging / graph.file, list(inputs), ["scores"],
                        inputs, manifest.opset, "legacy")
            else:
                models[graph.file] = onnx.load(str(src / graph.file))
        files = {manifest.weights_file: _externalise(models, staging / manifest.weights_file)}
        for file, model in models.items():
            onnx.save(model, str(staging / file))
            onnx.checker.check_model(str(staging / file), full_check=True)
            files[file] = (staging / file).stat().st_size
        dataclasses.replace(manifest, files=files).write(staging)
        for extra in src.iterdir():  # the model card and anything else beside the graphs
            if not (staging / extra.name).exists():
                shutil.copy2(extra, staging / extra.name)
        diff = _compare(src, staging, images)
        if not diff < 1e-5:
            sys.exit(f"the rebuilt head differs from the old one by {diff:.3g}: not written")
        if dst.exists():
            shutil.rmtree(dst)
        staging.rename(dst)
        return diff
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _compare(old: Path, new: Path, images: list[Path]) -> float:
    """Largest |score difference| of the two folders' heads: every image against every other,
    each folder run by the service's engine."""
    engines = [Engine(folder, providers=["cpu"], head_threads=1) for folder in (old, new)]
    first = engines[0]
    maps = first.encode(np.stack([first.preprocess(p) for p in images]), "b")
    gallery = first.prepare_gallery(maps)
    worst = 0.0
    for q in range(len(images)):
        probe = first.prepare_probe(maps[q:q + 1])
        a, b = (e.score(probe, gallery) for e in engines)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="model folder with the old head")
    parser.add_argument("dst", type=Path, help="where the rebuilt folder goes")
    parser.add_argument("--images", type=Path, required=True,
                        help="a folder of real person crops to compare the heads on")
    parser.add_argument("--limit", type=int, default=200, help="images compared (default 200)")
    args = parser.parse_args()
    images = sorted(args.images.glob("*.jpg"))[:args.limit] + sorted(
        args.images.glob("*.png"))[:args.limit]
    if len(images) < 2:
        sys.exit(f"{args.images}: fewer than 2 images")
    diff = rebuild(args.src, args.dst, images[:args.limit])
    print(f"rebuilt {args.dst}: {len(images[:args.limit])} images, every pair scored by both "
          f"heads, max |score difference| {diff:.3g}")


if __name__ == "__main__":
    main()
