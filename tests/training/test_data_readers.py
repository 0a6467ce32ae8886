"""Readers of the official layouts, on small trees generated here with the official names, and
the manifest reader on the shared data (counts from its README)."""

from collections import Counter

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from training.data import by_split, identities, read_manifest
from training.data import cuhk03 as cuhk03_module
from training.data.cuhk03 import (
    cuhk03_image_name,
    cuhk03_testsets,
    read_cuhk03,
    read_cuhk03_new_protocol,
)
from training.data.layout import DatasetLayoutError
from training.data.market1501 import parse_market1501_name, read_market1501
from training.data.viper import read_viper


def write_image(path, size=(8, 16), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# --- VIPeR ---------------------------------------------------------------------------------

def make_viper(root, pids=(0, 5, 12)):
    for pid in pids:
        write_image(root / "cam_a" / f"{pid:03d}_45.bmp")
        write_image(root / "cam_b" / f"{pid:03d}_90.bmp")
    return root


def test_viper_reader(tmp_path):
    records = read_viper(make_viper(tmp_path / "VIPeR"))
    assert [(r.pid, r.camid) for r in records] == [(0, 1), (0, 2), (5, 1), (5, 2), (12, 1),
                                                   (12, 2)]
    assert all(r.split == "all" and r.path.is_file() and r.path.is_absolute() for r in records)
    assert records[1].path.parent.name == "cam_b"
    # The archive's wrapper folder is found from its parent too.
    assert read_viper(tmp_path) == records


def test_viper_missing_camera_folder_is_named(tmp_path):
    write_image(tmp_path / "cam_a" / "000_45.bmp")
    with pytest.raises(DatasetLayoutError, match="cam_b"):
        read_viper(tmp_path)


def test_viper_person_without_a_pair_is_an_error(tmp_path):
    make_viper(tmp_path)
    write_image(tmp_path / "cam_a" / "077_0.bmp")
    with pytest.raises(ValueError, match="77"):
        read_viper(tmp_path)


# --- Market-1501 ---------------------------------------------------------------------------

def make_market(root):
    names = {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                               "0007_c3s3_015743_02.jpg"],
        "query": ["0003_c1s1_000876_00.jpg", "0004_c5s1_001001_00.jpg"],
        "bounding_box_test": ["0003_c4s2_011111_01.jpg", "0003_c1s1_000900_02.jpg",
                              "0004_c6s1_002002_01.jpg", "-1_c1s1_000401_03.jpg",
                              "0000_c2s1_000100_05.jpg", "0000_c3s1_000200_06.jpg"],
    }
    for folder, files in names.items():
        for name in files:
            write_image(root / folder / name)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return root


def test_market1501_reader(tmp_path):
    make_market(tmp_path / "Market-1501-v15.09.15")
    records = read_market1501(tmp_path)
    train, query, gallery = (by_split(records, s) for s in ("train", "query", "gallery"))
    assert [(r.pid, r.camid) for r in train] == [(2, 1), (2, 2), (7, 3)]
    assert [(r.pid, r.camid) for r in query] == [(3, 1), (4, 5)]
    # junk (-1) dropped, distractors kept as pid 0, camera from the name
    assert sorted((r.pid, r.camid) for r in gallery) == [(0, 2), (0, 3), (3, 1), (3, 4),
                                                         (4, 6)]
    assert len(records) == 10


def test_market1501_missing_folder_is_named(tmp_path):
    make_market(tmp_path)
    for f in (tmp_path / "query").iterdir():
        f.unlink()
    (tmp_path / "query").rmdir()
    with pytest.raises(DatasetLayoutError, match="query"):
        read_market1501(tmp_path)
    # Reading only the splits that are there works.
    assert len(read_market1501(tmp_path, splits=("train",))) == 3


def test_market1501_name_parsing():
    assert parse_market1501_name("1501_c6s4_001902_01.jpg") == (1501, 6)
    assert parse_market1501_name("-1_c1s1_000401_03.jpg") == (-1, 1)
    with pytest.raises(ValueError, match="PPPP_cCsS"):
        parse_market1501_name("0002.jpg")


# --- CUHK03 --------------------------------------------------------------------------------

def image_array(pair, person, column, height=12, width=6):
    """A distinct (H, W, 3) image per cell: its values encode where it came from."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = 10 * pair + 1
    arr[..., 1] = 10 * person + 1
    arr[..., 2] = 10 * column + 1
    arr[0, 0] = 255  # a corner mark: transposes and flips are visible
    return arr


def make_cuhk03_mat(path, persons=(3, 2), missing=((0, 1, 7), (1, 0, 2)),
                    testsets=(((1, 1), (2, 2)), ((1, 3), (2, 1)))):
    """A small ``cuhk-03.mat`` in the official v7.3 structure: object references to
    per-pair (10, persons) reference arrays, images stored (3, W, H) as MATLAB writes them,
    empty cells as MATLAB's empty-array marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as mat:
        refs = mat.create_group("#refs#")
        counter = iter(range(10_000))

        def store(array, **attrs):
            ds = refs.create_dataset(f"r{next(counter)}", data=array)
            for k, v in attrs.items():
                ds.attrs[k] = v
            return ds.ref

        for boxes, shade in (("labeled", 0), ("detected", 1)):
            pair_refs = []
            for pair, count in enumerate(persons):
                table = np.empty((10, count), dtype=h5py.ref_dtype)
                for person in range(count):
                    for column in range(10):
                        if (pair, person, column) in missing:
                            table[column, person] = store(np.zeros(2, np.uint64),
                                                          MATLAB_empty=1)
                        else:
                            img = image_array(pair, person, column)
                            img[1, 1] = shade
                            table[column, person] = store(img.T)
                pair_refs.append(store(table))
            mat.create_dataset(boxes, data=np.array([pair_refs], dtype=h5py.ref_dtype))
        sets = [store(np.asarray(ts, dtype=np.float64).T) for ts in testsets]
        mat.create_dataset("testsets", data=np.array([sets], dtype=h5py.ref_dtype))
    return path


def test_cuhk03_mat_reader_extracts_images(tmp_path):
    make_cuhk03_mat(tmp_path / "cuhk03_release" / "cuhk-03.mat")
    records = read_cuhk03(tmp_path)
    assert len(records) == 5 * 10 - 2
    # pids unique across pairs: pair 1's persons are 0-2, pair 2's 3-4
    assert identities(records) == [0, 1, 2, 3, 4]
    per_cam = Counter((r.pid, r.camid) for r in records)
    assert per_cam[(1, 2)] == 4 and per_cam[(3, 1)] == 4 and per_cam[(0, 1)] == 5
    assert {r.camid for r in records} == {1, 2} and {r.split for r in records} == {"all"}
    folder = tmp_path / "images_labeled"
    assert all(r.path.parent == folder for r in records)
    # the image of pair 2, person 1, column 7 (camera B): torchreid's name, right pixels
    rec = next(r for r in records if r.path.name == "2_001_2_08.png")
    assert (rec.pid, rec.camid) == (3, 2)
    with Image.open(rec.path) as img:
        assert img.size == (6, 12)  # (W, H): not transposed
        expected = image_array(1, 0, 7)
        expected[1, 1] = 0  # the labeled boxes' marker
        np.testing.assert_array_equal(np.asarray(img), expected)
    assert not (folder / cuhk03_image_name(0, 1, 7)).exists()  # the empty cell


def test_cuhk03_detected_boxes_and_cache_dir(tmp_path):
    mat_path = make_cuhk03_mat(tmp_path / "cuhk-03.mat")
    records = read_cuhk03(mat_path, boxes="detected", cache_dir=tmp_path / "cache")
    assert len(records) == 48 and records[0].path.parent == tmp_path / "cache"
    with Image.open(records[0].path) as img:
        assert np.asarray(img)[1, 1, 1] == 1  # the detected box's marker
    with pytest.raises(ValueError, match="boxes"):
        read_cuhk03(mat_path, boxes="hand")


def test_cuhk03_extraction_happens_once(tmp_path, monkeypatch):
    make_cuhk03_mat(tmp_path / "cuhk-03.mat")
    first = read_cuhk03(tmp_path)

    def refuse(path):
        raise AssertionError("the .mat was opened again")

    monkeypatch.setattr(cuhk03_module, "_open_mat", refuse)
    assert read_cuhk03(tmp_path) == first


def test_cuhk03_official_testsets(tmp_path):
    make_cuhk03_mat(tmp_path / "cuhk-03.mat")
    # (pair, person) 1-based: (1,1) -> pid 0, (2,2) -> pid 4, (1,3) -> 2, (2,1) -> 3
    assert cuhk03_testsets(tmp_path) == [[0, 4], [2, 3]]


def test_cuhk03_missing_mat_is_named(tmp_path):
    with pytest.raises(DatasetLayoutError, match="cuhk-03.mat"):
        read_cuhk03(tmp_path)


def make_new_protocol_config(root, boxes="labeled"):
    names = [cuhk03_image_name(0, 0, 0), cuhk03_image_name(0, 0, 5),
             cuhk03_image_name(0, 2, 1), cuhk03_image_name(1, 1, 6),
             cuhk03_image_name(1, 1, 0)]
    filelist = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        filelist[i, 0] = name
    savemat(root / f"cuhk03_new_protocol_config_{boxes}.mat", {
        "filelist": filelist,
        "labels": np.array([[1], [1], [3], [5], [5]], dtype=np.float64),
        "camId": np.array([[1], [2], [1], [2], [1]], dtype=np.float64),
        "train_idx": np.array([[1], [2], [3]], dtype=np.float64),
        "query_idx": np.array([[5]], dtype=np.float64),
        "gallery_idx": np.array([[4]], dtype=np.float64),
    })
    return names


def test_cuhk03_new_protocol_extracts_its_images_when_missing(tmp_path):
    make_cuhk03_mat(tmp_path / "cuhk03_release" / "cuhk-03.mat")
    names = make_new_protocol_config(tmp_path)
    records = read_cuhk03_new_protocol(tmp_path)
    assert [(r.path.name, r.pid, r.camid, r.split) for r in records] == [
        (names[0], 1, 1, "train"), (names[1], 1, 2, "train"), (names[2], 3, 1, "train"),
        (names[4], 5, 1, "query"), (names[3], 5, 2, "gallery")]
    assert all(r.path.is_file() for r in records)


def test_cuhk03_new_protocol_missing_parts_are_named(tmp_path):
    with pytest.raises(DatasetLayoutError, match="cuhk03_new_protocol_config_labeled.mat"):
        read_cuhk03_new_protocol(tmp_path)
    make_new_protocol_config(tmp_path)
    with pytest.raises(DatasetLayoutError, match="images_labeled"):
        read_cuhk03_new_protocol(tmp_path)


# --- Manifests of the shared data ----------------------------------------------------------

def test_viper_manifest_counts(data_dir):
    records = read_manifest(data_dir / "viper.csv")
    assert len(records) == 1264 and len(identities(records)) == 632
    assert Counter(r.camid for r in records) == {1: 632, 2: 632}
    assert {r.split for r in records} == {"all"}


def test_cuhk03_manifest_counts(data_dir):
    records = read_manifest(data_dir / "cuhk03-labeled.csv")
    assert len(records) == 8177 and len(identities(records)) == 843
    train, val = by_split(records, "train"), by_split(records, "val")
    assert (len(train), len(identities(train))) == (7239, 743)
    assert (len(val), len(identities(val))) == (938, 100)
    assert not set(identities(train)) & set(identities(val))
    assert {r.camid for r in records} == {1, 2}
