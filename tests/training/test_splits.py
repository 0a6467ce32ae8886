"""Seeded identity splits and the two-camera query/gallery protocol."""

from pathlib import Path

import pytest

from training.data import ImageRecord, by_split, identities, read_manifest
from training.data.splits import (
    carve_validation,
    cuhk03_official_split,
    cuhk03_split,
    query_gallery,
    split_by_identity,
    viper_split,
)


def two_camera_records(num_ids, per_cam=1, start=0):
    return [ImageRecord(Path(f"/x/{pid}_{cam}_{k}.png"), pid, cam, "all")
            for pid in range(start, start + num_ids) for cam in (1, 2) for k in range(per_cam)]


def pid_set(records):
    return set(identities(records))


def test_viper_split_halves_disjoint_and_seeded():
    records = two_camera_records(632)
    train, test = viper_split(records, seed=0)
    assert len(pid_set(train)) == len(pid_set(test)) == 316
    assert not pid_set(train) & pid_set(test)
    assert len(train) + len(test) == len(records)
    assert {r.split for r in train} == {"train"} and {r.split for r in test} == {"test"}
    assert viper_split(records, seed=0) == (train, test)
    assert pid_set(viper_split(records, seed=1)[1]) != pid_set(test)


def test_viper_split_on_the_shared_manifest(data_dir):
    train, test = viper_split(read_manifest(data_dir / "viper.csv"), seed=3)
    assert (len(train), len(test)) == (632, 632)
    queries, gallery = query_gallery(test)
    assert len(queries) == len(gallery) == 316


def test_cuhk03_split_sizes_disjoint_and_seeded():
    records = two_camera_records(1467, per_cam=2)
    train, val, test = cuhk03_split(records, seed=0)
    assert [len(pid_set(p)) for p in (train, val, test)] == [1160, 100, 100]
    assert not (pid_set(train) & pid_set(val) or pid_set(train) & pid_set(test)
                or pid_set(val) & pid_set(test))
    assert cuhk03_split(records, seed=0) == (train, val, test)
    assert pid_set(cuhk03_split(records, seed=1)[2]) != pid_set(test)
    everyone, _, _ = cuhk03_split(records, seed=0, num_train=None)
    assert len(pid_set(everyone)) == 1267


def test_cuhk03_split_needs_enough_identities():
    with pytest.raises(ValueError, match="1360"):
        cuhk03_split(two_camera_records(500), seed=0)


def test_cuhk03_official_split():
    records = two_camera_records(10)
    train, test = cuhk03_official_split(records, [[0, 1], [4, 7, 9]], k=2)
    assert pid_set(test) == {4, 7, 9} and pid_set(train) == {0, 1, 2, 3, 5, 6, 8}
    assert {r.split for r in test} == {"test"}
    with pytest.raises(ValueError, match="1..2"):
        cuhk03_official_split(records, [[0], [1]], k=3)
    with pytest.raises(ValueError, match="no records"):
        cuhk03_official_split(records, [[42]], k=1)


def test_carve_validation_by_count_and_fraction():
    records = two_camera_records(50, per_cam=2)
    train, val = carve_validation(records, num_ids=8, seed=5)
    assert len(pid_set(val)) == 8 and len(pid_set(train)) == 42
    assert not pid_set(train) & pid_set(val)
    assert carve_validation(records, num_ids=8, seed=5) == (train, val)
    assert pid_set(carve_validation(records, num_ids=8, seed=6)[1]) != pid_set(val)
    _, val = carve_validation(records, fraction=0.1, seed=0)
    assert len(pid_set(val)) == 5
    for bad in (dict(num_ids=50), dict(num_ids=0), dict(fraction=1.0), dict(),
                dict(num_ids=3, fraction=0.1)):
        with pytest.raises(ValueError):
            carve_validation(records, seed=0, **bad)


def test_carve_validation_on_the_shared_train_split(data_dir):
    train = by_split(read_manifest(data_dir / "cuhk03-labeled.csv"), "train")
    fit, val = carve_validation(train, num_ids=100, seed=0)
    assert len(pid_set(val)) == 100 and len(pid_set(fit)) == 643
    assert len(fit) + len(val) == 7239


def test_split_by_identity_rejects_two_open_parts():
    with pytest.raises(ValueError, match="at most one"):
        split_by_identity(two_camera_records(4), {"a": None, "b": None}, seed=0)


def test_query_gallery_cameras():
    records = two_camera_records(5, per_cam=2)
    queries, gallery = query_gallery(records)
    assert {r.camid for r in queries} == {1} and {r.camid for r in gallery} == {2}
    assert len(queries) == len(gallery) == 10
    with pytest.raises(ValueError, match="gallery"):
        query_gallery([r for r in records if r.camid == 1])
    with pytest.raises(ValueError, match="camera"):
        query_gallery(records + [ImageRecord(Path("/x/z.png"), 1, 3)])
