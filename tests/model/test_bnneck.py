"""The whole-Lite0 trunk and the BNNeck embedding: shapes, frozen stages, and the fused pair
head equal to the paper's equations step by step."""

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.embedding import BNNeckEmbedding
from model.trunks import EfficientNetLiteTrunk

SMALL = {"weights": None, "input_size": (64, 32)}


def test_head_cut_is_stride_32_with_1280_channels_and_freezes_leading_stages():
    trunk = EfficientNetLiteTrunk(frozen_stages=2, cut="head")
    assert (trunk.stride, trunk.out_channels, trunk.stages) == (32, 1280, 9)
    assert trunk(torch.randn(2, 3, 64, 32)).shape == (2, 1280, 2, 1)
    frozen = [trunk.conv_stem, trunk.bn1, trunk.blocks[0]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in trunk.blocks[1].parameters())
    trunk.train()
    assert not trunk.blocks[0].training and trunk.blocks[1].training
    with pytest.raises(ValueError, match="frozen_stages"):
        EfficientNetLiteTrunk(frozen_stages=10, cut="head")
    with pytest.raises(ValueError, match="cut"):
        EfficientNetLiteTrunk(cut="stride8")


def test_bnneck_variant_builds_an_8x4_grid_at_256x128():
    net = build_model("dsmi-lite0-bnneck", weights=None)
    assert net.map_size == (8, 4) and net.input_size == (256, 128)
    assert isinstance(net.fc, BNNeckEmbedding) and net.fc.out_features == 1280
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("dsmi-lite0-bnneck", weights=None, input_size=(48, 32))


@pytest.mark.parametrize("name", ["dsmi-lite0-bnneck", "dsmi-gap-lite0-bnneck",
                                  "mi-spp-lite0-bnneck", "bcnn-irnn-lite0-bnneck",
                                  "dsmi-lite0-stripes"])
def test_fused_scores_equal_the_equations_step_by_step(name):
    torch.manual_seed(0)
    net = build_model(name, **SMALL)
    with torch.no_grad():  # a trained-looking norm and a live head
        net.fc.bn.running_mean.normal_()
        net.fc.bn.running_var.uniform_(0.5, 2.0)
        net.fc.bn.weight.uniform_(0.5, 1.5)
        out = net.pooling.out_proj
        if out is not None:
            out.weight.normal_(std=0.05)
    net.eval()
    images = torch.randn(5, 3, 64, 32)
    with torch.no_grad():
        maps = net.encode(images)
        scores = net.score(maps[:1], maps)
        a, b = net.pair_representations(maps[:1].expand_as(maps), maps)
        reference = F.cosine_similarity(a, b)
        matrix = net.similarity_matrix(images)
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matrix[0], reference, atol=1e-5, rtol=1e-5)


def test_zero_head_scores_by_the_embeddings_cosine():
    torch.manual_seed(1)
    net = build_model("dsmi-lite0-bnneck", **SMALL).eval()
    with torch.no_grad():
        net.pooling.out_proj.weight.zero_()
        net.pooling.out_proj.bias.zero_()
        maps = net.encode(torch.randn(4, 3, 64, 32))
        emb = net.embed(maps)
        torch.testing.assert_close(net.score(maps[:1], maps),
                                   F.cosine_similarity(emb[:1], emb), atol=1e-6, rtol=1e-6)


def test_bnneck_has_no_shift_and_pools_before_the_norm():
    neck = BNNeckEmbedding(8).eval()
    assert not neck.bn.bias.requires_grad
    maps = torch.randn(3, 8, 4, 2)
    torch.testing.assert_close(neck.pooled(maps), maps.mean((2, 3)))
    torch.testing.assert_close(neck(maps), neck.scale() * (maps.mean((2, 3))
                                                           - neck.bn.running_mean))


def test_mirror_average_is_the_mean_of_both_views_and_only_outside_training():
    torch.manual_seed(2)
    net = build_model("dsmi-lite0-bnneck", **SMALL).eval()
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        plain = net.encode(images)
        mirrored = net.encode(images.flip(-1)).flip(-1)
        net.mirror_average = True
        averaged = net.encode(images)
        torch.testing.assert_close(averaged, 0.5 * (plain + mirrored))
        # A mirrored image now gives the mirrored map exactly.
        torch.testing.assert_close(net.encode(images.flip(-1)), averaged.flip(-1))
    net.train()
    assert net.encode(images).shape == plain.shape  # training sees one view


def test_stripes_keep_the_global_mean_then_each_band_from_the_top():
    neck = BNNeckEmbedding(3, stripes=2).eval()
    assert (neck.regions, neck.out_features, neck.bn.num_features) == (3, 9, 9)
    maps = torch.randn(2, 3, 4, 2)
    regions = neck.region_means(maps)
    assert regions.shape == (2, 3, 3)
    torch.testing.assert_close(regions[:, 0], maps.mean((2, 3)))
    torch.testing.assert_close(regions[:, 1], maps[:, :, :2].mean((2, 3)))
    torch.testing.assert_close(regions[:, 2], maps[:, :, 2:].mean((2, 3)))
    torch.testing.assert_close(neck.pooled(maps), regions.flatten(1))
    # Channels-last maps (the trainer's layout) pool the same.
    torch.testing.assert_close(
        neck.pooled(maps.contiguous(memory_format=torch.channels_last)), regions.flatten(1))
    with pytest.raises(ValueError, match="stripes"):
        neck.region_means(torch.randn(1, 3, 3, 2))


def test_striped_variant_embeds_three_regions_and_checks_the_map_height():
    net = build_model("dsmi-lite0-stripes", weights=None)
    assert net.map_size == (8, 4) and net.fc.out_features == 3 * 1280
    with pytest.raises(ValueError, match="stripes"):
        build_model("dsmi-lite0-stripes", weights=None, input_size=(96, 64))  # 3 rows
    with pytest.raises(ValueError, match="stripes"):
        build_model("dsmi-lite0", weights=None, stripes=2)  # the paper's FC embedding
