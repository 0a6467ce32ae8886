"""The serving split: per-image, cacheable gallery side, batched per-pair scoring."""

import pytest
import torch
import torch.nn.functional as F

from model import build_model, list_variants

SMALL = [v for v in list_variants() if v.endswith("-small")]


@pytest.fixture(params=SMALL)
def net_and_maps(request):
    torch.manual_seed(0)
    net = build_model(request.param).double().eval()
    images = torch.randn(7, 3, 128, 64, dtype=torch.float64)
    with torch.no_grad():
        yield net, net.encode(images, "a"), net.encode(images, "b"), images


def test_one_call_equals_separate_pair_calls(net_and_maps):
    net, maps_a, maps_b, _ = net_and_maps
    with torch.no_grad():
        batched = net.score(maps_a[:1], maps_b)
        separate = torch.cat([net.score(maps_a[:1], maps_b[k:k + 1]) for k in range(7)])
        chunked = net.score(maps_a[:1], maps_b, batch_size=3)
    assert torch.allclose(batched, separate, atol=1e-12)
    assert torch.allclose(batched, chunked, atol=1e-12)


def test_prepared_gallery_gives_the_same_scores(net_and_maps):
    net, maps_a, maps_b, _ = net_and_maps
    with torch.no_grad():
        raw = net.score(maps_a[2:3], maps_b)
        prepared = net.score(net.prepare_probe(maps_a[2:3]), net.prepare_gallery(maps_b))
    assert torch.equal(raw, prepared)


def test_fused_scoring_equals_the_paper_equations(net_and_maps):
    net, maps_a, maps_b, _ = net_and_maps
    if not hasattr(net, "pair_representations"):
        pytest.skip("FC-CNN has no pair head")
    with torch.no_grad():
        x_a, x_b = net.pair_representations(maps_a[:1].expand_as(maps_b), maps_b)
        expected = F.cosine_similarity(x_a, x_b, dim=1)
        assert torch.allclose(net.score(maps_a[:1], maps_b), expected, atol=1e-10)


def test_similarity_matrix_is_upper_pairs_mirrored(net_and_maps):
    net, maps_a, maps_b, images = net_and_maps
    with torch.no_grad():
        sim = net.similarity_matrix(images)
        for i in (0, 3):
            row = net.score(maps_a[i:i + 1], maps_b[i:])
            assert torch.allclose(sim[i, i:], row, atol=1e-10)
            assert torch.allclose(sim[i:, i], row, atol=1e-10)


def test_forward_scores_aligned_pairs(net_and_maps):
    net, maps_a, maps_b, images = net_and_maps
    with torch.no_grad():
        pairs = net(images[:1].expand(7, -1, -1, -1), images)
        assert torch.allclose(pairs, net.score(maps_a[:1], maps_b), atol=1e-10)


def test_score_rejects_a_batch_of_probes():
    net = build_model("dsmi-small").eval()
    maps = net.encode(torch.randn(2, 3, 128, 64))
    with pytest.raises(ValueError, match="one probe"):
        net.score(maps, maps)


def test_other_input_sizes_are_resampled_to_the_fc_grid():
    net = build_model("dsmi-small").eval()
    with torch.no_grad():
        maps = net.encode(torch.randn(3, 3, 160, 96))
        assert maps.shape[-2:] == (10, 6)
        assert net.score(maps[:1], maps).shape == (3,)
