"""Non-learned baselines on generated images."""

import numpy as np
import pytest
from PIL import Image

from training.baselines import (
    baseline_distance,
    histogram_features,
    pixel_features,
    rgb_to_hsv,
)


def person(top, bottom, seed, shift=0, size=(64, 128)):
    """A 'person': a shirt colour over a trousers colour, with texture noise, optionally
    shifted ``shift`` pixels right (the border repeated)."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float64)
    img[: h // 2] = top
    img[h // 2:] = bottom
    img += rng.normal(0, 12, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if shift:
        img = np.concatenate([np.repeat(img[:, :1], shift, axis=1), img[:, :-shift]], axis=1)
    return img


@pytest.fixture()
def images(tmp_path):
    paths = {}
    specs = {"query": ((200, 40, 40), (40, 40, 160), 0, 0),
             "shifted": ((200, 40, 40), (40, 40, 160), 0, 4),
             "other": ((40, 160, 60), (220, 200, 60), 1, 0),
             "swapped": ((40, 40, 160), (200, 40, 40), 2, 0)}
    for name, (top, bottom, seed, shift) in specs.items():
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(person(top, bottom, seed, shift)).save(paths[name])
    return paths


@pytest.mark.parametrize("name", ["histogram", "pixels"])
def test_an_image_is_nearest_its_shifted_copy(images, name):
    gallery = [images["other"], images["swapped"], images["shifted"]]
    dist = baseline_distance(name, [images["query"]], gallery)
    assert dist.shape == (1, 3)
    assert dist[0].argmin() == 2
    # the same image is at distance 0 from itself
    assert baseline_distance(name, [images["query"]], [images["query"]])[0, 0] == \
        pytest.approx(0, abs=1e-5)


def test_histogram_stripes_see_where_colours_are(images):
    # "swapped" has the same colours as the query, shirt and trousers exchanged: one stripe
    # (no spatial layout) cannot tell them apart much, six stripes can.
    one = baseline_distance("histogram", [images["query"]], [images["swapped"]], stripes=1)
    six = baseline_distance("histogram", [images["query"]], [images["swapped"]], stripes=6)
    assert six[0, 0] > 5 * one[0, 0]


def test_feature_shapes_and_norms(images):
    paths = list(images.values())
    hist = histogram_features(paths, stripes=4, bins=(8, 4, 4))
    pix = pixel_features(paths, size=(32, 16))
    assert hist.shape == (4, 4 * 128) and pix.shape == (4, 3 * 32 * 16)
    np.testing.assert_allclose(np.linalg.norm(hist, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pix, axis=1), 1, rtol=1e-5)
    assert (hist >= 0).all()


def test_rgb_to_hsv_known_colours():
    rgb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.5, 0.5, 0.5], [0, 0, 0]],
                   dtype=np.float64).T
    h, s, v = rgb_to_hsv(rgb)
    np.testing.assert_allclose(h, [0, 1 / 3, 2 / 3, 1 / 6, 0, 0], atol=1e-12)
    np.testing.assert_allclose(s, [1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(v, [1, 1, 1, 1, 0.5, 0])


def test_unknown_baseline_is_an_error(images):
    with pytest.raises(ValueError, match="histogram"):
        baseline_distance("sift", [images["query"]], [images["other"]])
