"""Export a matching network to ONNX for the service, split where caching pays.

Graphs (all float32, NCHW):

- ``trunk_a.onnx``: images ``(B, 3, H, W)`` -> conv5 ``maps`` ``(B, C, K1, K2)``, dynamic B;
  ``trunk_b.onnx`` too when the two streams do not share a trunk (``net.shares_trunk``).
- ``probe.onnx`` / ``gallery.onnx``: ``maps`` ``(B, C, K1, K2)`` -> the fields of
  ``net.prepare_probe`` / ``net.prepare_gallery`` (``joint``, ``embedding``; FC-CNN has only
  ``embedding``), dynamic B. The gallery side is what the service caches per gallery image.
- ``head.onnx``: ``probe_<field>`` (batch 1) and ``gallery_<field>`` (batch N) -> ``scores``
  ``(N,)``, dynamic N: ``net.score_features`` with the fused head weights baked in.

Weights live in one external-data file, ``weights.bin``, shared by the graphs: a tensor that
two graphs hold (the FC of the probe and gallery sides) is stored once. ``manifest.json``
(:class:`model.formats.ExportManifest`, written here and read by ``service/engine.py``)
describes the folder. See :func:`export_model`.

This module is on the training side (PyTorch, onnx); the service only reads its output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.utils._pytree as pytree
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data
from torch import nn

from .calibration import Calibration
from .formats import (
    INPUT_LAYOUT,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    WEIGHTS_FILE,
    ExportManifest,
    GraphFile,
)
from .network import MatchingNetwork
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "EXPORTERS", "export_model",
           "model_id", "verify_export"]

EXPORTERS = ("legacy", "dynamo")
# Initializers smaller than this stay inside their graph: not worth an external record.
_INLINE_BYTES = 1024
_ALIGN = 64


# ---------------------------------------------------------------------------------------------
# The graphs, as modules with plain tensor inputs and outputs


class _Trunk(nn.Module):
    """images ``(B, 3, H, W)`` -> conv5 maps ``(B, C, K1, K2)`` of one stream."""

    def __init__(self, net: MatchingNetwork, stream: str) -> None:
        super().__init__()
        self.net, self.stream = net, stream

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.encode(images, self.stream)


class _Side(nn.Module):
    """conv5 maps ``(B, C, K1, K2)`` -> the probe or gallery side's tensors, as a tuple."""

    def __init__(self, net: MatchingNetwork, side: str) -> None:
        super().__init__()
        self.net = net
        self.prepare = net.prepare_probe if side == "probe" else net.prepare_gallery

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.prepare(maps))


class _Head(nn.Module):
    """One probe's fields (batch 1) and N gallery items' fields -> scores ``(N,)``.

    ``net.head_weights()`` (fused linear maps) is computed once here and kept as buffers, so
    the graph holds the fused matrices rather than recomputing them on every call.
    """

    def __init__(self, net: MatchingNetwork, feature_type: type) -> None:
        super().__init__()
        self.net, self.feature_type = net, feature_type
        leaves, self._spec = pytree.tree_flatten(net.head_weights())
        self._is_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        self._constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                self.register_buffer(f"head_weight_{k}", leaf.detach().clone())

    def forward(self, *fields: torch.Tensor) -> torch.Tensor:
        leaves = [getattr(self, f"head_weight_{k}") if t else self._constants[k]
                  for k, t in enumerate(self._is_tensor)]
        weights = pytree.tree_unflatten(leaves, self._spec)
        half = len(fields) // 2
        return self.net.score_features(self.feature_type(*fields[:half]),
                                       self.feature_type(*fields[half:]), weights)


class _Pair(nn.Module):
    """The naive design: aligned image pairs -> scores, the whole network per pair."""

    def __init__(self, net: MatchingNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        return self.net(images_a, images_b)


# ---------------------------------------------------------------------------------------------
# Export helpers


_ADDED_FIELDS = {"stripes": 0}  # VariantSpec fields newer than the first exports: default


def model_id(net: MatchingNetwork) -> str:
    """A short sha256 of the weights and of the architecture they are for.

    Same weights in the same architecture -> the same id; any changed weight, or test-time
    flip (``mirror_average``), -> another id.
    The architecture (``net.spec`` without the pretrained-weight sources) is hashed too,
    because two variants with equal weight shapes (the gate with and without its sigmoid)
    compute different things. ``num_batches_tracked`` counters are left out: they do not
    change any output.
    """
    digest = hashlib.sha256()
    spec = getattr(net, "spec", None)
    if spec is not None:
        # A field added after models were exported counts only away from its default, so
        # the ids (and cache namespaces) of those models stay what they were.
        arch = {k: v for k, v in dataclasses.asdict(spec).items()
                if k not in ("weights", "weights_b") and _ADDED_FIELDS.get(k, ...) != v}
        digest.update(json.dumps(arch, sort_keys=True, default=list).encode())
    if net.mirror_average:  # other maps from the same weights: another cache namespace
        digest.update(b"mirror_average")
    for name, tensor in sorted(net.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        arr = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                  input_names: Sequence[str], output_names: Sequence[str],
                  dynamic: dict[str, int | None], opset: int, exporter: str) -> onnx.ModelProto:
    """Export one module and load it back. ``dynamic`` maps each input name to the axis that
    is dynamic (or ``None``); the outputs' batch axis follows."""
    module.eval()
    if exporter == "legacy":
        dyn_axes = {name: {axis: f"{name}_batch"} for name, axis in dynamic.items()
                    if axis is not None}
        batch_name = next(iter(dyn_axes.values()))[0] if dyn_axes else None
        # All outputs share the dynamic batch of the first dynamic input.
        for name in output_names:
            dyn_axes[name] = {0: batch_name}
        with warnings.catch_warnings():
            # Tracer warnings about shape checks turned into constants: the checks are on the
            # fixed map size and channel counts, which are constant for an exported model.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dyn_axes,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    elif exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1)
        shapes = tuple({axis: batch} if axis is not None else None
                       for axis in dynamic.values())
        if isinstance(module, _Head):
            shapes = (shapes,)  # forward(*fields): one varargs entry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, input_names=list(input_names),
                                        output_names=list(output_names),
                                        dynamic_shapes=shapes, opset_version=opset,
                                        dynamo=True, verbose=False)
        program.save(str(path), external_data=False)
    else:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    return onnx.load(str(path))


def _externalise(models: dict[str, onnx.ModelProto], weights_path: Path) -> int:
    """Move every large initializer of ``models`` into one file, each distinct tensor once.

    Returns the file's size. Tensors are identified by dtype, shape and content, so a weight
    that several graphs hold (the FC in the probe and gallery graphs) is written once.
    """
    seen: dict[tuple, tuple[int, int]] = {}
    offset = 0
    with weights_path.open("wb") as fh:
        for model in models.values():
            for tensor in model.graph.initializer:
                arr = numpy_helper.to_array(tensor)
                if arr.nbytes < _INLINE_BYTES:
                    continue
                data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).digest())
                if key not in seen:
                    pad = -offset % _ALIGN
                    fh.write(b"\0" * pad)
                    offset += pad
                    fh.write(data)
                    seen[key] = (offset, len(data))
                    offset += len(data)
                start, length = seen[key]
                external = onnx.TensorProto()
                external.name = tensor.name
                external.data_type = tensor.data_type
                external.dims.extend(tensor.dims)
                external.raw_data = data  # set_external_data insists on raw data being there
                set_external_data(external, WEIGHTS_FILE, offset=start, length=length)
                external.data_location = onnx.TensorProto.EXTERNAL
                external.ClearField("raw_data")
                tensor.CopyFrom(external)
    return offset


def _shapes(tensors: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape[1:]) for t in tensors]


def export_model(net: MatchingNetwork, out_dir: str | Path, opset: int = 17,
                 exporter: str = "legacy", check: bool = True, pair_graph: bool = False,
                 overwrite: bool = True, calibration: Calibration | None = None
                 ) -> ExportManifest:
    """Export ``net`` (eval mode) into ``out_dir`` and return its manifest (also written as
    ``manifest.json``, :meth:`ExportManifest.write`).

    ``exporter``: ``"legacy"`` (TorchScript tracing, ``torch.onnx.export(dynamo=False)``; the
    default: exact on every variant, dynamic batch and N, and fast) or ``"dynamo"``
    (``torch.export``). ``check`` runs ``onnx.checker`` (full check, with shape inference) on
    every graph. ``pair_graph`` also writes ``pair.onnx``, the whole two-stream network per
    image pair (``net.forward``), used by the benchmark as the naive design.
    The head graph is the model's own ``score_features`` traced (one implementation of the
    per-pair arithmetic for training, PyTorch inference and ONNX Runtime).
    The folder is written next to ``out_dir`` first and moved into place, so a failed export
    never leaves half a folder. ``calibration`` (the match probability fitted in training)
    goes into the manifest, where the service reads it.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists")
    was_training = net.training
    net.eval()
    try:
        manifest = _export_into(net, out_dir, opset, exporter, check, pair_graph,
                                calibration)
    finally:
        net.train(was_training)
    return manifest


def _export_into(net: MatchingNetwork, out_dir: Path, opset: int, exporter: str, check: bool,
                 pair_graph: bool, calibration: Calibration | None = None) -> ExportManifest:
    h, w = net.input_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, h, w, generator=generator)
    with torch.no_grad():
        maps = net.encode(images, "a")
        probe = net.prepare_probe(maps[:1])
        gallery = net.prepare_gallery(maps)
    fields = list(type(probe)._fields)
    if list(type(gallery)._fields) != fields:
        raise ValueError("probe and gallery sides must have the same fields")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a service's own user
    try:
        models: dict[str, onnx.ModelProto] = {}
        graphs: dict[str, GraphFile] = {}

        def add(key: str, module: nn.Module, args: tuple, inputs: dict[str, int | None],
                outputs: list[str]) -> None:
            file = f"{key}.onnx"
            with torch.no_grad():
                models[file] = _export_graph(module, args, staging / file, list(inputs),
                                             outputs, inputs, opset, exporter)
            graphs[key] = GraphFile(file, tuple(inputs), tuple(outputs))

        streams = ["a"] if net.shares_trunk else ["a", "b"]
        for stream in streams:
            add(f"trunk_{stream}", _Trunk(net, stream), (images,), {"images": 0}, ["maps"])
        add("probe", _Side(net, "probe"), (maps,), {"maps": 0}, fields)
        add("gallery", _Side(net, "gallery"), (maps,), {"maps": 0}, fields)
        head_inputs = {f"probe_{f}": None for f in fields}
        head_inputs.update({f"gallery_{f}": 0 for f in fields})
        add("head", _Head(net, type(probe)), tuple(probe) + tuple(gallery), head_inputs,
            ["scores"])
        if pair_graph:
            add("pair", _Pair(net), (images, images.flip(0)),
                {"images_a": 0, "images_b": 0}, ["scores"])
        if net.shares_trunk:
            graphs["trunk_b"] = graphs["trunk_a"]  # one file serves both streams

        weights_size = _externalise(models, staging / WEIGHTS_FILE)
        files = {WEIGHTS_FILE: weights_size}
        opsets = set()
        for file, model in models.items():
            onnx.save(model, str(staging / file))
            if check:
                onnx.checker.check_model(str(staging / file), full_check=True)
            files[file] = (staging / file).stat().st_size
            opsets.update(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

        manifest = _manifest(net, fields, maps, probe, gallery, graphs, files, exporter,
                             calibration, sorted(opsets))
        manifest.write(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime
        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # exporting does not need it
        pass
    return versions


def _as_json(value: dict) -> dict:
    """``value`` as a reader of the manifest sees it (tuples become lists): the manifest an
    export returns equals the one read back from its folder."""
    return json.loads(json.dumps(value))


def _manifest(net: MatchingNetwork, fields: list[str], maps: torch.Tensor, probe, gallery,
              graphs: dict[str, GraphFile], files: dict[str, int], exporter: str,
              calibration: Calibration | None, opsets: list[int]) -> ExportManifest:
    spec = getattr(net, "spec", None)
    return ExportManifest(
        model_id=model_id(net),
        variant=net.variant,
        build_args=_as_json({k: v for k, v in net.build_args.items()
                             if k not in ("weights", "weights_b")}),
        spec=_as_json({k: v for k, v in dataclasses.asdict(spec).items()
                       if k not in ("weights", "weights_b")}) if spec is not None else None,
        input_size=tuple(net.input_size),
        mean=tuple(getattr(net, "mean", IMAGENET_MEAN)),
        std=tuple(getattr(net, "std", IMAGENET_STD)),
        input_layout=INPUT_LAYOUT,
        shares_trunk=net.shares_trunk,
        mirror_average=bool(net.mirror_average),
        map_shape=tuple(maps.shape[1:]),
        fields=tuple(fields),
        probe_fields=dict(zip(fields, _shapes(probe), strict=True)),
        gallery_fields=dict(zip(fields, _shapes(gallery), strict=True)),
        opset=opsets[0] if len(opsets) == 1 else tuple(opsets),
        exporter=f"torch.onnx.export(dynamo={exporter == 'dynamo'})",
        graphs=graphs,
        weights_file=WEIGHTS_FILE,
        files=files,
        versions=_versions(),
        calibration=calibration,
    )


# ---------------------------------------------------------------------------------------------
# dsmi export


def verify_export(net: MatchingNetwork, out_dir: Path, n: int = 8, seed: int = 0) -> float:
    """Score random images with PyTorch and with the exported graphs (ONNX Runtime, CPU);
    return the largest absolute difference of the scores."""
    import onnxruntime as ort

    manifest = ExportManifest.read(out_dir)
    sessions = {key: ort.InferenceSession(str(out_dir / g.file),
                                          providers=["CPUExecutionProvider"])
                for key, g in manifest.graphs.items()}
    images = torch.randn(n, 3, *net.input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = net.score(net.encode(images[:1], "a"), net.encode(images, "b")).numpy()
    maps_a = sessions["trunk_a"].run(None, {"images": images[:1].numpy()})[0]
    maps_b = sessions["trunk_b"].run(None, {"images": images.numpy()})[0]
    fields = manifest.fields
    probe = sessions["probe"].run(None, {"maps": maps_a})
    gallery = sessions["gallery"].run(None, {"maps": maps_b})
    feed = {f"probe_{f}": t for f, t in zip(fields, probe, strict=True)}
    feed.update({f"gallery_{f}": t for f, t in zip(fields, gallery, strict=True)})
    scores = sessions["head"].run(None, feed)[0]
    return float(np.abs(scores - expected).max())
