"""Config loading, the paper's augmentation, and the batch samplers."""

from collections import Counter

import pytest
import torch

from tests.conftest import ROOT
from training.config import ConfigError, load_config
from training.data.sampling import IdentityBatchSampler, RandomBatchSampler
from training.data.transforms import FlipShift, shift_image


def test_configs_load_and_overrides_apply():
    cpu = load_config(ROOT / "configs" / "cpu.yaml")
    assert cpu.model.variant == "dsmi-lite0" and cpu.train.batch_size == 128
    assert cpu.train.max_minutes <= 60 and cpu.train.optimizer == "adamw"
    gpu = load_config(ROOT / "configs" / "gpu.yaml")
    assert gpu.model.variant == "dsmi-lite0" and gpu.train.device == "cuda"
    assert gpu.data.num_workers > 0
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert paper.model.variant == "dsmi" and paper.train.pretrain_epochs > 0
    cfg = load_config(ROOT / "configs" / "cpu.yaml",
                      ["train.lr=0.05", "model.variant=fc-cnn-small", "train.shift=[1, 2]",
                       "model.overrides.embed_dim=16"])
    assert cfg.train.lr == 0.05 and cfg.model.variant == "fc-cnn-small"
    assert cfg.train.shift == (1, 2) and cfg.model.overrides == {"embed_dim": 16}


@pytest.mark.parametrize("bad,match", [(["train.lrr=1"], "unknown key"),
                                       (["train.lr"], "key=value"),
                                       (["model=3"], "mapping")])
def test_bad_overrides_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "cpu.yaml", bad)


@pytest.mark.parametrize("bad,match", [
    ("train.sampler=pkk", "train.sampler is 'pkk'; allowed: random, pk"),
    ("train.optimizer=adamm", "allowed: adam, adamw, sgd"),
    ("train.schedule=cos", "allowed: cosine, constant"),
    ("train.precision=fp16", "allowed: fp32, bf16"),
    ("data.protocol=market", "allowed: manifest, viper, cuhk03, market1501"),
    ("train.device=gpu", "allowed: cpu, cuda, cuda:N"),
    ("train.lr=fast", "train.lr must be float"),
    ("train.flip=3", "train.flip must be bool"),
    ("train.batch_size=0", "train.batch_size must be positive"),
    ("train.instances_per_id=5", "multiple of train.instances_per_id"),
    ("train.shift=[1]", "train.shift must be two pixel counts"),
    ("model.variant=dsmi-tiny", "unknown variant 'dsmi-tiny'"),
    ("model.overrides.embedd=3", r"unknown override\(s\) \['embedd'\]"),
])
def test_config_values_are_checked_when_the_config_loads(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "cpu.yaml", [bad])


def test_yaml_exponent_numbers_are_floats():
    # PyYAML reads 1e-3 (no dot) as a string; a float field takes it as the number it is.
    assert load_config(ROOT / "configs" / "cpu.yaml", ["train.lr=1e-3"]).train.lr == 0.001


def test_shift_moves_content_and_repeats_the_border():
    image = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)
    right = shift_image(image, 2, 0)
    assert torch.equal(right[:, :, 2:], image[:, :, :3])
    assert torch.equal(right[:, :, 0], image[:, :, 0])
    assert torch.equal(right[:, :, 1], image[:, :, 0])
    up = shift_image(image, 0, -1)
    assert torch.equal(up[:, :3], image[:, 1:]) and torch.equal(up[:, 3], image[:, 3])
    assert torch.equal(shift_image(image, 0, 0), image)


def test_flip_shift_draws_all_paper_copies():
    image = torch.randn(3, 8, 6)
    aug = FlipShift(flip=True, shift=(1, 2), generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(300):
        out = aug(image)
        assert out.shape == image.shape
        for flip in (False, True):
            base = image.flip(-1) if flip else image
            for dx in (-1, 0, 1):
                for dy in (-2, 0, 2):
                    if torch.equal(out, shift_image(base, dx, dy)):
                        seen.add((flip, dx, dy))
    assert len(seen) == 18


def test_flip_shift_on_a_batch_draws_per_image():
    images = torch.randn(64, 3, 8, 6)
    aug = FlipShift(flip=True, shift=(1, 2), generator=torch.Generator().manual_seed(1))
    out = aug(images)
    assert out.shape == images.shape
    copies = []
    for image, result in zip(images, out, strict=True):
        match = [(flip, dx, dy) for flip in (False, True) for dx in (-1, 0, 1)
                 for dy in (-2, 0, 2)
                 if torch.equal(result, shift_image(image.flip(-1) if flip else image, dx, dy))]
        assert match, "every image is one of its 18 copies"
        copies.append(match[0])
    assert len(set(copies)) > 9  # drawn per image, not one draw for the batch
    assert not torch.equal(images, out)


def test_random_batches_cover_each_image_once_per_epoch_and_reshuffle():
    sampler = RandomBatchSampler(300, batch_size=128, seed=1)
    first = list(sampler)
    assert len(first) == 2 and all(len(b) == 128 for b in first)
    flat = [i for b in first for i in b]
    assert len(set(flat)) == 256
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_identity_batches_hold_k_images_of_p_people():
    pids = [p for p in range(40) for _ in range(3 + p % 4)]
    sampler = IdentityBatchSampler(pids, batch_size=32, instances=4, seed=0)
    batches = list(sampler)
    assert len(batches) == 40 // 8
    for batch in batches:
        counts = Counter(pids[i] for i in batch)
        assert len(counts) == 8 and set(counts.values()) == {4}


def test_random_erasing_blanks_one_rectangle_per_chosen_image():
    import torch

    from training.data.transforms import RandomErasing

    images = torch.ones(6, 3, 32, 16)
    out = RandomErasing(p=1.0, generator=torch.Generator().manual_seed(0))(images)
    assert torch.equal(images, torch.ones(6, 3, 32, 16))  # the input is left alone
    for k in range(6):
        zero = out[k, 0] == 0
        assert zero.any() and torch.equal(out[k, 0] == 0, out[k, 2] == 0)
        rows, cols = zero.nonzero(as_tuple=True)
        box = zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()  # one solid rectangle
        assert 0.02 * 512 * 0.5 <= zero.sum() <= 0.4 * 512 * 1.5
    assert torch.equal(RandomErasing(p=0.0)(images), images)
