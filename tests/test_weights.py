"""Pretrained trunk weights: from a file, from the local torch cache, or a clear error."""

import pytest
import torch
from torchvision.models import vgg16

from model import WeightsNotFoundError, build_model


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
