"""The inference engine: an exported model folder (``dsmi export``) run by ONNX Runtime.

No PyTorch here: NumPy, ONNX Runtime and the shared preprocessing of :mod:`model.preprocess`.
The network is split where caching pays (see ``model/export.py``):

- ``encode``: images -> conv5 maps (the trunk, once per image);
- ``prepare_gallery`` / ``prepare_probe``: conv5 maps -> the per-image tensors the head needs
  (the gallery side is what the service caches, in the bytes of ``engine.codec``);
- ``score``: one probe against any number of gallery items, streamed in batches of at most
  ``batch_size`` items, so memory stays bounded whatever the gallery size.

Providers: ``providers=None`` picks CUDA when ONNX Runtime lists it *and* a session really gets
it (``onnxruntime-gpu`` lists it even where the CUDA libraries are missing), else the CPU. The
environment variable ``DSMI_PROVIDERS`` (comma-separated, e.g. ``cpu`` or
``CUDAExecutionProvider,CPUExecutionProvider``; ``cuda``/``cpu``/``tensorrt`` are accepted as
short names) overrides the automatic choice when ``providers`` is not given.
``Engine.providers`` is what ONNX Runtime really uses.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from model.calibration import Calibration
from model.formats import (
    GRAPHS,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ExportManifest,
    ManifestError,
)
from model.preprocess import ImageDecodeError, load_image_tensor

from .store.codec import CACHE_DTYPES, TensorCodec

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Engine", "ModelFolderError", "ImageDecodeError", "MANIFEST_FORMAT",
           "MANIFEST_VERSION", "PROVIDERS_ENV", "CACHE_DTYPES", "resolve_providers"]

log = logging.getLogger(__name__)

# Kept in step with model/export.py (which imports torch, so it is not imported here).
PROVIDERS_ENV = "DSMI_PROVIDERS"

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_ALIASES = {"cuda": CUDA, "cpu": CPU, "tensorrt": "TensorrtExecutionProvider"}
# Providers that ONNX Runtime listed but could not start in this process (e.g. CUDA without its
# libraries): not asked for again, so that each new engine does not log the same failure.
_UNUSABLE: set[str] = set()


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


class ModelFolderError(RuntimeError):
    """The model folder is missing, incomplete, malformed or of another format."""


def nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU that a process can open (its device node)."""
    return os.path.exists("/dev/nvidia0") or bool(glob.glob("/dev/nvidia[0-9]*"))


def resolve_providers(providers: Sequence[str] | None = None) -> list[str]:
    """The provider list to ask ONNX Runtime for: ``providers``, else ``$DSMI_PROVIDERS``,
    else CUDA (when listed by ONNX Runtime and an NVIDIA GPU is present) then CPU.

    Names may be short (``cuda``, ``cpu``). Providers this ONNX Runtime build does not have are
    dropped with a warning, and so are those that failed to start earlier in this process; the
    CPU provider is always last, as the fallback.
    """
    if providers is None:
        env = os.environ.get(PROVIDERS_ENV, "").strip()
        if env:
            providers = [p.strip() for p in env.split(",") if p.strip()]
    available = ort.get_available_providers()
    if providers is None:
        providers = []
        if CUDA in available:
            if nvidia_gpu_present():
                providers = [CUDA]
            else:
                # onnxruntime-gpu lists CUDA whether or not there is a GPU; asking for it
                # without one prints a long library-loading error before falling back.
                log.info("ONNX Runtime: CPU provider (no NVIDIA GPU on this machine; "
                         "CUDA is used when /dev/nvidia0 exists)")
    wanted = []
    for name in providers:
        name = _ALIASES.get(name.lower(), name)
        if name not in available:
            log.warning("ONNX Runtime provider %s is not available here (available: %s); "
                        "ignoring it", name, ", ".join(available))
        elif name in _UNUSABLE:
            log.info("ONNX Runtime provider %s failed to start earlier; not asking again", name)
        elif name not in wanted:
            wanted.append(name)
    if CPU in wanted:
        wanted.remove(CPU)
    return wanted + [CPU]


class Engine:
    """Loads an exported model folder and runs it with ONNX Runtime.

    ``providers``: e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``, or ``None``
    (``$DSMI_PROVIDERS``, else CUDA when usable, else CPU). ``batch_size``: most gallery items
    per head call (and per gallery-side call). ``image_batch_size``: most images per trunk call
    (default ``batch_size``; lower it for big trunks, whose activations grow with the batch).
    ``cache_dtype``: dtype of the cacheable tensors that ``prepare_gallery`` returns and
    ``codec`` stores (``"float16"`` halves the cache; scoring always runs in float32).
    ``intra_op_threads``: ONNX Runtime's thread count (default: its own choice).
    ``head_batch_size``: most gallery items per head call on the CPU (default 128, capped by
    ``batch_size``): a chunk's working set then stays in the cache; 128 scored 12% more pairs
    per second than 256 on two cores (docs/inference.md, "Channels last"). Under CUDA the
    head takes ``batch_size`` items per call.
    ``head_threads``: on the CPU, how many chunks of gallery items the head scores at once,
    each on one thread (default: the CPUs this process may use; 1: one chunk at a time, on
    ONNX Runtime's own threads). The head's small matrix products split badly across threads
    inside one run, and whole chunks side by side scored 1.56x more pairs per second on
    two cores (``bench.head_bench``; docs/inference.md, "Channels last"). Under CUDA the head
    runs one chunk at a time.
    ``place_galleries``: whether resident galleries are placed where the head runs and scored
    from there without a copy per call (:meth:`place`, :meth:`score_placed`); default: when
    the head runs on CUDA (where the per-chunk host-to-device copy was the cost).
    ``spin_wait``: whether ONNX Runtime's threads busy-wait for work between runs. Off by
    default: in a server, the spinning threads hold the cores that the next step needs (stage
    one's matrix product after a head call took 4.8 ms with spinning, 0.3 ms without; without
    it the head loses 3-12% of its throughput, docs/inference.md).
    """

    def __init__(self, model_dir: str | Path, providers: Sequence[str] | None = None,
                 batch_size: int = 256, cache_dtype: str = "float32", warmup: bool = True,
                 image_batch_size: int | None = None,
                 intra_op_threads: int | None = None, spin_wait: bool = False,
                 place_galleries: bool | None = None, head_threads: int | None = None,
                 head_batch_size: int = 128) -> None:
        if cache_dtype not in CACHE_DTYPES:  # before any file is read
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, not {cache_dtype!r}")
        if int(batch_size) < 1 or (image_batch_size is not None and int(image_batch_size) < 1):
            raise ValueError("batch sizes must be at least 1")
        if head_threads is not None and int(head_threads) < 1:
            raise ValueError("head_threads must be at least 1")
        if int(head_batch_size) < 1:
            raise ValueError("batch sizes must be at least 1")
        self.model_dir = Path(model_dir)
        self.batch_size = int(batch_size)
        self.image_batch_size = int(image_batch_size or batch_size)
        self.cache_dtype = cache_dtype
        self._cache_np = np.dtype(cache_dtype).newbyteorder("<")
        try:
            self.manifest = ExportManifest.read(self.model_dir)
        except ManifestError as exc:  # the engine's one error for a folder it cannot load
            raise ModelFolderError(str(exc)) from exc
        m = self.manifest
        self.model_id: str = m.model_id
        self.variant: str = m.variant
        self.input_size: tuple[int, int] = m.input_size
        self.mean, self.std = m.mean, m.std
        self.map_shape: tuple[int, ...] = m.map_shape
        # The match probability fitted in training; a model without one reports none.
        self.calibration: Calibration | None = m.calibration
        self.gallery_fields: tuple[str, ...] = m.fields
        self.probe_spec = {f: m.probe_fields[f] for f in self.gallery_fields}
        self.gallery_spec: dict[str, tuple[tuple[int, ...], str]] = {
            f: (m.gallery_fields[f], cache_dtype) for f in self.gallery_fields}
        # The cache bytes of a gallery item: its gallery fields, nothing else. The conv5 map
        # they are computed from is not kept: nothing reads it back, and in float32 it was
        # twelve times the fields' bytes (160 KiB of the bundled model's 173 KiB per item).
        self.codec = TensorCodec({f: shape for f, (shape, _) in self.gallery_spec.items()},
                                 cache_dtype, required=self.gallery_fields)
        wanted = resolve_providers(providers)
        self.head_threads = 1 if wanted[0] != CPU else int(head_threads or _usable_cpus())
        self._sessions = self._open_sessions(wanted, intra_op_threads, spin_wait)
        self.providers: list[str] = list(self._sessions["head"].get_providers())
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        if self.device == "cuda":
            self.head_threads = 1
        self.head_batch_size = (self.batch_size if self.device == "cuda"
                                else min(self.batch_size, int(head_batch_size)))
        # Made here, not on first use: two first queries at once would make two.
        self._pool = (ThreadPoolExecutor(self.head_threads, thread_name_prefix="dsmi-head")
                      if self.head_threads > 1 else None)
        self.places_galleries = (self.device == "cuda" if place_galleries is None
                                 else bool(place_galleries))
        if warmup:
            self.warmup()

    # -- loading ---------------------------------------------------------------------------

    def _session_options(self, threads: int | None, spin_wait: bool) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spin_wait else "0")
        if threads:
            options.intra_op_num_threads = int(threads)
        return options

    def _open_sessions(self, wanted: list[str], threads: int | None,
                       spin_wait: bool) -> dict[str, ort.InferenceSession]:
        options = self._session_options(threads, spin_wait)
        # The head's parallelism is across chunks (head_threads), one thread per run.
        head_options = (options if self.head_threads == 1
                        else self._session_options(1, spin_wait))
        sessions: dict[str, ort.InferenceSession] = {}
        opened: dict[str, ort.InferenceSession] = {}  # file -> session: trunk_b may be trunk_a
        for key in GRAPHS:
            file = self.manifest.graphs[key].file
            if file not in opened:
                path = self.model_dir / file
                if not path.is_file():
                    raise ModelFolderError(f"{self.model_dir} is incomplete: {file} is missing")
                try:
                    session = ort.InferenceSession(
                        str(path), head_options if key == "head" else options,
                        providers=wanted)
                except Exception as exc:  # ONNX Runtime raises its own types for bad files
                    raise ModelFolderError(f"ONNX Runtime cannot load {path}: {exc}") from exc
                got = session.get_providers()
                dropped = [p for p in wanted if p not in got]
                if dropped:
                    # Listed but unusable (e.g. onnxruntime-gpu without the CUDA libraries):
                    # say so once and stop asking for it, instead of failing again per graph.
                    log.warning("ONNX Runtime could not use %s; running on %s",
                                ", ".join(dropped), ", ".join(got))
                    wanted = [p for p in wanted if p in got]
                    _UNUSABLE.update(dropped)
                opened[file] = session
            sessions[key] = opened[file]
        self._check_graphs(sessions)
        return sessions

    def _check_graphs(self, sessions: dict[str, ort.InferenceSession]) -> None:
        """The graphs' input and output names must be those the manifest's fields imply."""
        fields = list(self.gallery_fields)
        expected = {
            "trunk_a": (["images"], ["maps"]), "trunk_b": (["images"], ["maps"]),
            "probe": (["maps"], fields), "gallery": (["maps"], fields),
            "head": ([f"probe_{f}" for f in fields] + [f"gallery_{f}" for f in fields],
                     ["scores"]),
        }
        for key, (inputs, outputs) in expected.items():
            s = sessions[key]
            got_in = sorted(i.name for i in s.get_inputs())
            got_out = sorted(o.name for o in s.get_outputs())
            if got_in != sorted(inputs) or got_out != sorted(outputs):
                raise ModelFolderError(
                    f"{self.model_dir / self.manifest.graphs[key].file}: inputs "
                    f"{got_in} and outputs {got_out} do not match the manifest (expected "
                    f"{sorted(inputs)} and {sorted(outputs)})")

    def warmup(self) -> None:
        """One small run of each graph: the first run allocates and picks kernels."""
        images = np.zeros((1, 3, *self.input_size), np.float32)
        maps = self.encode(images, "a")
        if self._sessions["trunk_b"] is not self._sessions["trunk_a"]:
            self.encode(images, "b")
        probe = self.prepare_probe(maps)
        gallery = self.prepare_gallery(np.concatenate([maps, maps]))
        self.score(probe, [gallery])

    @property
    def cache_namespace(self) -> str:
        """A key prefix for cached bytes: the model id and the stored dtype, so that caches
        of different models, or of one model stored in float32 and float16, stay apart."""
        return f"{self.model_id}-{self.cache_dtype}"

    # -- images -----------------------------------------------------------------------------

    def preprocess(self, data: bytes | str | Path | Image.Image) -> np.ndarray:
        """Encoded image bytes, a path, or an image from :func:`model.preprocess.decode_image`
        -> ``(3, H, W)`` float32, exactly as training does it
        (:func:`model.preprocess.load_image_tensor`). Raises :class:`ImageDecodeError`."""
        return load_image_tensor(data, self.input_size, self.mean, self.std)

    def encode(self, images: np.ndarray, stream: str = "a") -> np.ndarray:
        """``(B, 3, H, W)`` preprocessed images -> conv5 maps ``(B, C, K1, K2)`` float32, in
        batches of ``image_batch_size``. ``stream``: ``"a"`` (probe) or ``"b"`` (gallery)."""
        if stream not in ("a", "b"):
            raise ValueError(f"stream must be 'a' or 'b', not {stream!r}")
        images = np.asarray(images)
        expected = (3, *self.input_size)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), "
                             f"not {images.shape}")
        session = self._sessions[f"trunk_{stream}"]
        parts = [session.run(None, {"images": np.ascontiguousarray(
                     images[k:k + self.image_batch_size], np.float32)})[0]
                 for k in range(0, len(images), self.image_batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, *self.map_shape), np.float32)

    # -- per-image sides --------------------------------------------------------------------

    def _check_maps(self, maps: np.ndarray) -> np.ndarray:
        maps = np.asarray(maps)
        if maps.ndim != 4 or maps.shape[1:] != self.map_shape:
            raise ValueError(f"maps must have shape (B, {', '.join(map(str, self.map_shape))}), "
                             f"not {maps.shape}")
        return maps

    def _side(self, key: str, maps: np.ndarray, dtype: np.dtype) -> dict[str, np.ndarray]:
        maps = self._check_maps(maps)
        session = self._sessions[key]
        names = [o.name for o in session.get_outputs()]
        parts: dict[str, list[np.ndarray]] = {f: [] for f in self.gallery_fields}
        for k in range(0, len(maps), self.batch_size):
            chunk = np.ascontiguousarray(maps[k:k + self.batch_size], np.float32)
            for name, value in zip(names, session.run(names, {"maps": chunk}), strict=True):
                parts[name].append(value.astype(dtype, copy=False))
        spec = self.probe_spec if key == "probe" else {f: s for f, (s, _) in
                                                        self.gallery_spec.items()}
        return {f: np.concatenate(v) if v else np.zeros((0, *spec[f]), dtype)
                for f, v in parts.items()}

    def prepare_gallery(self, maps: np.ndarray) -> dict[str, np.ndarray]:
        """conv5 maps ``(B, C, K1, K2)`` (stream B) -> ``{field: (B, *shape)}`` in
        ``cache_dtype``: what the head needs from each gallery image (cacheable)."""
        return self._side("gallery", maps, self._cache_np)

    def prepare_probe(self, maps: np.ndarray) -> dict[str, np.ndarray]:
        """conv5 maps ``(1, C, K1, K2)`` (stream A) -> ``{field: (1, *shape)}`` float32."""
        return self._side("probe", maps, np.dtype(np.float32))

    # -- scoring ----------------------------------------------------------------------------

    def _probe_feed(self, probe: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for f, shape in self.probe_spec.items():
            if f not in probe:
                raise ValueError(f"probe lacks field {f!r} (needs {list(self.probe_spec)})")
            value = np.asarray(probe[f])
            if value.shape != (1, *shape):
                raise ValueError(f"probe field {f!r} must have shape {(1, *shape)}, "
                                 f"not {value.shape}: score takes one probe")
            feed[f"probe_{f}"] = np.ascontiguousarray(value, np.float32)
        return feed

    def _gallery_batch(self, batch: Mapping[str, np.ndarray]) -> tuple[int, dict]:
        arrays, n = {}, None
        for f, (shape, _) in self.gallery_spec.items():
            if f not in batch:
                raise ValueError(f"gallery batch lacks field {f!r} "
                                 f"(needs {list(self.gallery_spec)})")
            value = np.asarray(batch[f])
            if value.ndim != len(shape) + 1 or value.shape[1:] != shape:
                raise ValueError(f"gallery field {f!r} must have shape (N, "
                                 f"{', '.join(map(str, shape))}), not {value.shape}")
            if n is not None and len(value) != n:
                raise ValueError("gallery fields of one batch differ in length")
            n = len(value)
            arrays[f] = value
        return n or 0, arrays

    def score(self, probe: Mapping[str, np.ndarray],
              gallery_batches: Iterable[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray]
              ) -> np.ndarray:
        """One probe (``prepare_probe``'s output) against gallery items -> similarities
        ``(N,)`` float32, in gallery order.

        ``gallery_batches``: an iterable of batch dicts (``prepare_gallery`` or ``codec.decode``
        output, float32 or float16), consumed lazily; one dict is taken as one batch. Each
        batch is scored in chunks of at most ``batch_size`` items, so working memory depends
        on ``batch_size``, not on the gallery size (plus 4 bytes of result per item).
        """
        feed = self._probe_feed(probe)
        if isinstance(gallery_batches, Mapping):
            gallery_batches = [gallery_batches]
        head = self._sessions["head"]

        def run(chunk_feed: dict[str, np.ndarray]) -> np.ndarray:
            return head.run(["scores"], chunk_feed)[0]

        chunks = self._chunk_feeds(feed, gallery_batches)
        if self._pool is None:
            parts = [run(f) for f in chunks]
        else:
            parts = list(self._in_parallel(run, chunks))
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _chunk_feeds(self, probe_feed: dict[str, np.ndarray],
                     gallery_batches: Iterable[Mapping[str, np.ndarray]]
                     ) -> Iterator[dict[str, np.ndarray]]:
        """The head's feeds, one per chunk of at most ``head_batch_size`` items. With several
        head threads a batch is cut into at least that many chunks (of 16 items or more), so
        that a short list (stage two's 100 items) still keeps every thread busy."""
        for batch in gallery_batches:
            n, arrays = self._gallery_batch(batch)
            per_thread = -(-n // self.head_threads)
            step = max(1, min(self.head_batch_size, max(per_thread, 16)))
            for k in range(0, n, step):
                chunk = {f"gallery_{f}": np.ascontiguousarray(value[k:k + step], np.float32)
                         for f, value in arrays.items()}
                yield {**probe_feed, **chunk}

    def _in_parallel(self, run, feeds: Iterator[dict[str, np.ndarray]]
                     ) -> Iterator[np.ndarray]:
        """``run`` over ``feeds`` on the head threads, results in order; at most two chunks
        per thread are in flight, so memory stays bounded on a streamed gallery."""
        pending: deque[Future] = deque()
        try:
            for f in feeds:
                pending.append(self._pool.submit(run, f))
                if len(pending) >= 2 * self.head_threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an error stops the rest
                future.cancel()

    # -- placed galleries (device-resident) ---------------------------------------------------

    @property
    def chunk_rows(self) -> int:
        """Rows per placed chunk: one head call each."""
        return self.batch_size

    def place(self, arrays: Mapping[str, np.ndarray], start: int, stop: int
              ) -> list[dict[str, ort.OrtValue]]:
        """Rows ``start`` (a multiple of :attr:`chunk_rows`) to ``stop`` of gallery arrays
        ``{field: (N, *shape)}`` -> chunks of ``chunk_rows`` rows, each ``{field: OrtValue}``
        in float32 on :attr:`device` (GPU memory under CUDA): placed once, bound to the head
        by :meth:`score_placed` without a copy."""
        if start % self.chunk_rows:
            raise ValueError(f"start {start} is not a multiple of {self.chunk_rows}")
        n, _ = self._gallery_batch({f: a[start:stop] for f, a in arrays.items()})
        return [{f: ort.OrtValue.ortvalue_from_numpy(
                     np.ascontiguousarray(arrays[f][k:min(k + self.chunk_rows, stop)],
                                          np.float32), self.device, 0)
                 for f in self.gallery_spec}
                for k in range(start, start + n, self.chunk_rows)]

    def score_placed(self, probe: Mapping[str, np.ndarray],
                     chunks: Sequence[Mapping[str, ort.OrtValue]]) -> np.ndarray:
        """:meth:`score` on placed chunks (:meth:`place`): the same similarities, in order;
        only the probe (one row) and the scores cross to and from the device."""
        head = self._sessions["head"]
        binding = head.io_binding()
        for name, value in self._probe_feed(probe).items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
                value, self.device, 0))
        parts = []
        for chunk in chunks:
            for f, value in chunk.items():
                binding.bind_ortvalue_input(f"gallery_{f}", value)
            binding.bind_output("scores", "cpu")
            head.run_with_iobinding(binding)
            parts.append(binding.copy_outputs_to_cpu()[0])
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
