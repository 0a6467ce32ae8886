"""Every named variant: output shapes at both input sizes, and one training step."""

import pytest
import torch

from model import binomial_deviance, build_model, list_variants, variant_spec

FULL = [v for v in list_variants() if not v.endswith("-small")]
SMALL = [v for v in list_variants() if v.endswith("-small")]


@pytest.mark.parametrize("name", list_variants())
@pytest.mark.parametrize("size", [(224, 224), (128, 64)])
def test_shapes(name, size):
    torch.manual_seed(0)
    stripes = variant_spec(name).stripes
    if stripes and (size[0] // 32) % stripes:  # striped variants have stride-32 trunks
        with pytest.raises(ValueError, match="stripes"):  # e.g. 7 rows do not split in two
            build_model(name, input_size=size)
        return
    net = build_model(name, input_size=size).eval()
    images = torch.randn(3, 3, *size)
    stride = net.trunks[0].stride  # 16, or 32 for the whole Lite0
    grid = (size[0] // stride, size[1] // stride)
    assert net.map_size == grid
    with torch.no_grad():
        maps = net.encode(images)
        if net.spec.trunk.endswith("-head"):
            assert maps.shape == (3, 1280, *grid)
            assert (maps >= 0).all()  # its head conv ends in a ReLU6
        elif net.spec.trunk == "lite0":
            assert maps.shape == (3, 112, *grid)  # ends on a linear bottleneck: any sign
        else:
            assert maps.shape == (3, 512, *grid)
            assert (maps >= 0).all()  # conv5 ends in its ReLU
        scores = net.score(maps[:1], maps)
        assert scores.shape == (3,)
        assert torch.isfinite(scores).all() and (scores.abs() <= 1 + 1e-5).all()
        sim = net.similarity_matrix(images)
        assert sim.shape == (3, 3)
        assert torch.allclose(sim, sim.T)


@pytest.mark.parametrize("name", list_variants())
def test_one_training_step(name):
    torch.manual_seed(0)
    net = build_model(name, input_size=(128, 64)).train()
    images = torch.randn(6, 3, 128, 64)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = net.similarity_matrix(images)
    loss = binomial_deviance(sim, pids[:, None] == pids[None],
                             valid=~torch.eye(6, dtype=torch.bool))
    assert torch.isfinite(loss)
    loss.backward()
    first_conv = next(m for m in net.trunks[0].modules()
                      if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad)
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0
    if len(net.trunks) > 1:  # the unshared stream-B trunk learns too
        conv_b = next(m for m in net.trunks[1].modules() if isinstance(m, torch.nn.Conv2d))
        assert conv_b.weight.grad.abs().sum() > 0
    before = first_conv.weight.detach().clone()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert not torch.equal(before, first_conv.weight)


def test_streams_share_one_trunk_unless_the_variant_mixes_families():
    assert build_model("dsmi-small").shares_trunk
    mixed = build_model("dsmi-vggd-vggm-small")
    assert not mixed.shares_trunk
    a, b = mixed.trunks
    assert type(a.features[0]) is type(b.features[0])
    assert a.features[0].kernel_size == (3, 3) and b.features[0].kernel_size == (7, 7)
    images = torch.randn(2, 3, 128, 64)
    assert not torch.allclose(mixed.encode(images, "a"), mixed.encode(images, "b"))


def test_paper_widths_of_the_default_variant():
    net = build_model("dsmi")
    assert net.input_size == (224, 224)
    assert net.fusion.U.out_channels == 512 and net.fusion.sigmoid
    assert len(net.pooling.layers) == 2
    assert net.pooling.layers[0].recurrence.hidden == 512
    assert net.pooling.layers[0].dropout.p == 0.5
    assert net.fc.in_features == 512 * 14 * 14


def test_unknown_variant_and_override_are_errors():
    with pytest.raises(KeyError, match="unknown variant"):
        build_model("dsmi-large")
    with pytest.raises(TypeError, match="unknown override"):
        build_model("dsmi-small", hiden=3)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("dsmi-small", input_size=(100, 64))


def test_lite0_variants_share_the_imagenet_trunk_and_freeze_its_first_stages():
    names = [v for v in list_variants() if v.endswith("-lite0")]
    assert {"dsmi-lite0", "fc-cnn-lite0", "mi-spp-lite0", "bcnn-irnn-lite0",
            "dsmi-gap-lite0"} <= set(names)
    net = build_model("dsmi-lite0", weights=None)
    assert net.input_size == (192, 96) and net.map_size == (12, 6)
    trunk = net.trunks[0]
    frozen = [trunk.conv_stem, trunk.bn1, *trunk.blocks[:3]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in trunk.blocks[3:].parameters())
    net.train()
    assert not trunk.bn1.training and not trunk.blocks[2].training  # statistics stay ImageNet's
    assert trunk.blocks[3].training
    before = trunk.bn1.running_mean.clone()
    net.encode(torch.randn(4, 3, 192, 96))
    assert torch.equal(trunk.bn1.running_mean, before)
    with pytest.raises(ValueError, match="trunk_frozen is for the lite trunks"):
        build_model("dsmi-small", trunk_frozen=1)
