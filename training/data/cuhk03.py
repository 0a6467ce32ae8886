"""CUHK03 in its official release: ``cuhk-03.mat`` and the 767/700 "new protocol" split files.

``cuhk-03.mat`` is a MATLAB v7.3 file (HDF5). Its ``labeled`` and ``detected`` datasets each hold
five camera pairs; a pair is a cell array of (persons x 10) image references, columns 0-4 camera
A (camid 1) and 5-9 camera B (camid 2); an empty cell is an image the release does not have.
The images are arrays inside the file, so they are extracted once into an image folder,
``images_labeled/`` or ``images_detected/`` in the dataset root, with torchreid's file names
(``{pair}_{person:03d}_{view}_{image:02d}.png``, 1-based), which are also the names the new
protocol's ``filelist`` uses. Person ids are unique across pairs: the persons of pair 1 are
pids 0..n1-1, those of pair 2 follow, and so on. ``testsets`` holds the 20 official test sets
of 100 (pair, person) pairs each (1-based).

Layouts found: ``ROOT/cuhk-03.mat`` or ``ROOT/cuhk03_release/cuhk-03.mat`` (the archive), the
new protocol's ``ROOT/cuhk03_new_protocol_config_{labeled,detected}.mat`` beside them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .layout import DatasetLayoutError
from .records import ImageRecord

__all__ = ["CUHK03_BOXES", "find_cuhk03_mat", "extract_cuhk03", "read_cuhk03",
           "cuhk03_testsets", "read_cuhk03_new_protocol", "cuhk03_image_name"]

CUHK03_BOXES = ("labeled", "detected")
MAT_NAME = "cuhk-03.mat"
_MAT_PLACES = (MAT_NAME, f"cuhk03_release/{MAT_NAME}")
_INDEX_VERSION = 1


def _check_boxes(boxes: str) -> str:
    if boxes not in CUHK03_BOXES:
        raise ValueError(f"boxes must be one of {CUHK03_BOXES}, not {boxes!r}")
    return boxes


def find_cuhk03_mat(root: str | Path) -> Path:
    """``root`` if it is the .mat file, else ``root/cuhk-03.mat`` or
    ``root/cuhk03_release/cuhk-03.mat``; :class:`DatasetLayoutError` if none is there."""
    root = Path(root)
    if root.is_file():
        return root
    for place in _MAT_PLACES:
        if (root / place).is_file():
            return root / place
    raise DatasetLayoutError(f"CUHK03: {MAT_NAME} not found (looked for "
                             f"{', '.join(str(root / p) for p in _MAT_PLACES)})")


def _dataset_root(root: str | Path, mat_path: Path) -> Path:
    """The folder that holds the image folders and split files: the root the caller named,
    or the .mat's folder (its parent for the archive's ``cuhk03_release/``)."""
    root = Path(root)
    if root.is_dir():
        return root
    parent = mat_path.parent
    return parent.parent if parent.name == "cuhk03_release" else parent


def cuhk03_image_name(pair: int, person: int, column: int) -> str:
    """torchreid's name for the image in 0-based ``pair``, ``person``, ``column`` (0-9)."""
    view = 1 if column < 5 else 2
    return f"{pair + 1}_{person + 1:03d}_{view}_{column + 1:02d}.png"


def _open_mat(mat_path: Path):
    import h5py

    try:
        return h5py.File(mat_path, "r")
    except OSError as exc:
        raise ValueError(f"CUHK03: {mat_path} is not a MATLAB v7.3 (HDF5) file: {exc}") from exc


def _refs(mat, name: str, mat_path: Path) -> np.ndarray:
    if name not in mat:
        raise DatasetLayoutError(f"CUHK03: {mat_path} has no {name!r} dataset "
                                 f"(has {sorted(mat.keys())})")
    return np.asarray(mat[name][()]).ravel()


def _pair_tables(mat, boxes: str, mat_path: Path) -> list[np.ndarray]:
    """Per camera pair, the (persons, 10) array of image references."""
    tables = []
    for ref in _refs(mat, boxes, mat_path):
        table = np.asarray(mat[ref][()]).T  # MATLAB is column-major: HDF5 holds (10, persons)
        if table.ndim != 2 or table.shape[1] != 10:
            raise ValueError(f"CUHK03: a {boxes} camera pair in {mat_path} has shape "
                             f"{table.shape}, expected (persons, 10)")
        tables.append(table)
    return tables


def _pid_offsets(persons_per_pair: list[int]) -> list[int]:
    return [int(v) for v in np.concatenate([[0], np.cumsum(persons_per_pair)[:-1]])]


def _write_png(array: np.ndarray, path: Path) -> None:
    # Written under a temporary name and renamed: an interrupted extraction leaves no half file.
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    os.replace(tmp, path)


def extract_cuhk03(mat_path: str | Path, boxes: str = "labeled",
                   cache_dir: str | Path | None = None, progress: bool = False
                   ) -> list[ImageRecord]:
    """Extract one box type's images from ``cuhk-03.mat`` (once) -> records (split ``all``).

    ``cache_dir``: where the PNGs go (default: ``images_{boxes}/`` in the dataset root). An
    index file written last marks a complete extraction; later calls read it instead of the
    .mat. Images already there are not rewritten.
    """
    boxes = _check_boxes(boxes)
    mat_path = find_cuhk03_mat(mat_path)
    cache = Path(cache_dir) if cache_dir is not None else (
        _dataset_root(mat_path, mat_path) / f"images_{boxes}")
    index_path = cache / f"cuhk03-{boxes}-index.json"
    source = {"mat": mat_path.name, "bytes": mat_path.stat().st_size, "boxes": boxes,
              "version": _INDEX_VERSION}
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("source") == source:
            return [ImageRecord(cache / name, pid, camid, "all")
                    for name, pid, camid in index["images"]]
    cache.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, int, int]] = []
    with _open_mat(mat_path) as mat:
        tables = _pair_tables(mat, boxes, mat_path)
        offsets = _pid_offsets([t.shape[0] for t in tables])
        cells = [(p, person) for p, t in enumerate(tables) for person in range(t.shape[0])]
        if progress:
            from tqdm import tqdm
            cells = tqdm(cells, desc=f"extract CUHK03 {boxes}", unit="person")
        for pair, person in cells:
            for column, ref in enumerate(tables[pair][person]):
                if not ref:
                    continue  # a null reference: no image
                array = np.asarray(mat[ref][()])
                if array.ndim != 3:
                    continue  # MATLAB stores an empty cell as its dimensions, e.g. [0, 0]
                name = cuhk03_image_name(pair, person, column)
                if not (cache / name).is_file():
                    _write_png(array.T, cache / name)  # (3, W, H) -> (H, W, 3)
                images.append((name, offsets[pair] + person, 1 if column < 5 else 2))
    if not images:
        raise ValueError(f"CUHK03: no {boxes} images in {mat_path}")
    tmp = index_path.with_name(f".{index_path.name}.tmp")
    tmp.write_text(json.dumps({"source": source, "images": images}))
    os.replace(tmp, index_path)
    return [ImageRecord(cache / name, pid, camid, "all") for name, pid, camid in images]


def read_cuhk03(root: str | Path, boxes: str = "labeled", cache_dir: str | Path | None = None,
                progress: bool = False) -> list[ImageRecord]:
    """Every image of the official release (all five pairs; 1467 persons), split ``all``.

    Use :func:`training.data.splits.cuhk03_split` for the paper's random 1160/100/100 split or
    :func:`cuhk03_testsets` with :func:`training.data.splits.cuhk03_official_split` for the
    20 official test sets.
    """
    return extract_cuhk03(find_cuhk03_mat(root), boxes, cache_dir, progress)


def cuhk03_testsets(root: str | Path) -> list[list[int]]:
    """The 20 official test sets of ``cuhk-03.mat``, each as the pids (see
    :func:`read_cuhk03`) of its 100 persons."""
    mat_path = find_cuhk03_mat(root)
    with _open_mat(mat_path) as mat:
        # Pair sizes are the same for labeled and detected boxes; the shapes are enough.
        sizes = [int(mat[ref].shape[-1]) for ref in _refs(mat, "labeled", mat_path)]
        offsets = _pid_offsets(sizes)
        testsets = []
        for ref in _refs(mat, "testsets", mat_path):
            pairs = np.asarray(mat[ref][()]).T.astype(np.int64)  # (100, 2): pair, person
            if pairs.ndim != 2 or pairs.shape[1] != 2:
                raise ValueError(f"CUHK03: a test set in {mat_path} has shape {pairs.shape}, "
                                 "expected (persons, 2)")
            if (pairs < 1).any() or (pairs[:, 0] > len(sizes)).any() or any(
                    person > sizes[pair - 1] for pair, person in pairs):
                raise ValueError(f"CUHK03: a test set in {mat_path} names a person that is "
                                 "not in the release")
            testsets.append([offsets[pair - 1] + person - 1 for pair, person in pairs])
    return testsets


def read_cuhk03_new_protocol(root: str | Path, boxes: str = "labeled",
                             cache_dir: str | Path | None = None, progress: bool = False
                             ) -> list[ImageRecord]:
    """The 767/700 split of Zhong et al. (CVPR 2017): records with splits ``train``,
    ``query`` and ``gallery``; pids are the split file's ``labels``, camids its ``camId``.

    Reads ``cuhk03_new_protocol_config_{boxes}.mat`` from ``root`` and the images from
    ``images_{boxes}/`` (or ``cache_dir``); when that folder is missing and ``cuhk-03.mat`` is
    there, the images are extracted from it first.
    """
    from scipy.io import loadmat

    boxes = _check_boxes(boxes)
    root = Path(root)
    config = root / f"cuhk03_new_protocol_config_{boxes}.mat"
    if not config.is_file():
        raise DatasetLayoutError(f"CUHK03 new protocol: {config} not found")
    images = Path(cache_dir) if cache_dir is not None else root / f"images_{boxes}"
    if not images.is_dir():
        try:
            mat_path = find_cuhk03_mat(root)
        except DatasetLayoutError as exc:
            raise DatasetLayoutError(f"CUHK03 new protocol: image folder {images} not found, "
                                     f"and no {MAT_NAME} to extract it from") from exc
        extract_cuhk03(mat_path, boxes, images, progress)
    try:
        split = loadmat(config)
    except (NotImplementedError, ValueError) as exc:
        raise ValueError(f"CUHK03 new protocol: cannot read {config}: {exc}") from exc
    missing = [k for k in ("train_idx", "query_idx", "gallery_idx", "labels", "camId",
                           "filelist") if k not in split]
    if missing:
        raise DatasetLayoutError(f"CUHK03 new protocol: {config} lacks {missing}")
    labels = np.asarray(split["labels"]).ravel().astype(np.int64)
    cams = np.asarray(split["camId"]).ravel().astype(np.int64)
    files = [str(np.asarray(f).ravel()[0]) for f in np.asarray(split["filelist"]).ravel()]
    if not len(labels) == len(cams) == len(files):
        raise ValueError(f"CUHK03 new protocol: {config} has {len(labels)} labels, "
                         f"{len(cams)} camIds and {len(files)} files")
    records = []
    for name in ("train", "query", "gallery"):
        idx = np.asarray(split[f"{name}_idx"]).ravel().astype(np.int64) - 1  # 1-based in MATLAB
        if len(idx) and (idx.min() < 0 or idx.max() >= len(files)):
            raise ValueError(f"CUHK03 new protocol: {name}_idx in {config} is out of range")
        records += [ImageRecord(images / files[i], int(labels[i]), int(cams[i]), name)
                    for i in idx]
    absent = [r.path for r in records if not r.path.is_file()]
    if absent:
        raise DatasetLayoutError(f"CUHK03 new protocol: {len(absent)} image(s) listed in "
                                 f"{config.name} are not in {images}, e.g. {absent[0].name}")
    return records
