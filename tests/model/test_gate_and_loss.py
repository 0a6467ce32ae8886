"""The gate's gradient property (Eq. 3), the fusions, and the binomial deviance loss."""

import math

import pytest
import torch

from model import BilinearFusion, HadamardFusion, MultiplicativeGate, binomial_deviance


def test_gradient_to_stream_a_vanishes_where_the_other_gate_is_zero():
    torch.manual_seed(0)
    gate = MultiplicativeGate(in_channels=6, embed_dim=4, sigmoid=False)  # Eq. 1
    with torch.no_grad():
        gate.V.bias.zero_()  # b_B = 0
    g_a = torch.randn(1, 6, 3, 3, requires_grad=True)
    g_b = torch.randn(1, 6, 3, 3)
    g_b[..., 1, 2] = 0  # V^T g_B = 0 at (1, 2) ...
    g_b[..., 0, 0] = 0  # ... and at (0, 0)
    out = gate(g_a, g_b)
    (out * torch.randn_like(out)).sum().backward()
    grad = g_a.grad[0].abs().sum(0)
    assert grad[1, 2] == 0 and grad[0, 0] == 0
    others = torch.ones(3, 3, dtype=torch.bool)
    others[1, 2] = others[0, 0] = False
    assert (grad[others] > 0).all()


def test_gate_is_equation_two():
    torch.manual_seed(0)
    gate = MultiplicativeGate(in_channels=5, embed_dim=3)
    g_a, g_b = torch.randn(2, 5, 2, 2), torch.randn(2, 5, 2, 2)
    cell_a, cell_b = g_a[1, :, 1, 0], g_b[1, :, 1, 0]
    u, v = gate.U.weight.flatten(1), gate.V.weight.flatten(1)
    p = gate.projection.weight.flatten(1)
    expected = p @ (torch.sigmoid(u @ cell_a + gate.U.bias)
                    * torch.sigmoid(v @ cell_b + gate.V.bias)) + gate.projection.bias
    assert torch.allclose(gate(g_a, g_b)[1, :, 1, 0], expected, atol=1e-6)


def test_hadamard_and_bilinear_fusions():
    g_a, g_b = torch.rand(2, 4, 3, 2), torch.rand(2, 4, 3, 2)
    assert torch.equal(HadamardFusion(4)(g_a, g_b), g_a * g_b)
    bil = BilinearFusion(4, rank=3)
    joint = bil.combine(bil.embed_a(g_a), bil.embed_b(g_b))
    assert joint.shape == (2, 9, 3, 2)
    ea, eb = bil.embed_a(g_a)[0, :, 1, 1], bil.embed_b(g_b)[0, :, 1, 1]
    assert torch.allclose(joint[0, :, 1, 1], torch.outer(ea, eb).flatten())
    assert torch.allclose(joint[0, :, 1, 1].norm(), torch.tensor(1.0), atol=1e-5)
    assert bil(g_a, g_b).shape == (2, 4, 3, 2)


def test_loss_matches_a_hand_computation():
    sim = torch.tensor([[0.9, 0.2, -0.3],
                        [0.4, 0.8, 0.6]])
    same = torch.tensor([[True, False, False],
                         [False, True, True]])

    def term(s, m):
        return math.log(1 + math.exp(-2.0 * (s - 0.5) * m))

    positives = [term(0.9, 1), term(0.8, 1), term(0.6, 1)]
    negatives = [term(0.2, -1), term(-0.3, -1), term(0.4, -1)]
    expected = sum(positives) / 3 + sum(negatives) / 3
    assert binomial_deviance(sim, same).item() == pytest.approx(expected, rel=1e-6)
    # other alpha and beta reach the formula
    alt = binomial_deviance(sim, same, alpha=3.0, beta=0.1).item()
    expected_alt = (sum(math.log(1 + math.exp(-3 * (s - 0.1))) for s in (0.9, 0.8, 0.6)) / 3
                    + sum(math.log(1 + math.exp(3 * (s - 0.1))) for s in (0.2, -0.3, 0.4)) / 3)
    assert alt == pytest.approx(expected_alt, rel=1e-6)


def test_weights_balance_one_positive_against_a_hundred_negatives():
    # The positive sits as far above beta as the negatives sit below it: equally well matched.
    sim = torch.full((1, 101), 0.3)
    sim[0, 0] = 0.7
    same = torch.zeros(1, 101, dtype=torch.bool)
    same[0, 0] = True
    sim.requires_grad_()
    loss = binomial_deviance(sim, same)
    loss.backward()
    # the one positive pulls as hard as all the negatives together push
    assert sim.grad[0, 0].abs() == pytest.approx(sim.grad[0, 1:].abs().sum().item(), rel=1e-5)
    # and both kinds contribute the same amount to the loss
    term = math.log(1 + math.exp(-2 * 0.2))
    assert loss.item() == pytest.approx(2 * term, rel=1e-6)
    # unweighted, the negatives would outweigh the positive a hundred to one
    plain = torch.nn.functional.softplus(-2 * (sim - 0.5) * (same.float() * 2 - 1)).sum()
    assert plain.item() == pytest.approx(101 * term, rel=1e-5)


def test_valid_mask_and_missing_kinds():
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same = torch.eye(2, dtype=torch.bool)
    valid = ~torch.eye(2, dtype=torch.bool)
    only_negatives = binomial_deviance(sim, same, valid=valid).item()
    assert only_negatives == pytest.approx(math.log(1 + math.exp(2 * (0 - 0.5))), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        binomial_deviance(sim, same[:1])


def test_batch_hard_triplet_takes_the_hardest_pairs():
    from model import batch_hard_triplet

    # Two people on a line: anchor 0's farthest positive is at 3, its nearest negative at 2.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    pids = torch.tensor([0, 0, 1, 0])
    loss = batch_hard_triplet(x, pids, margin=0.5)
    # anchors 0, 1, 3 (person 0): d_ap 3, 2, 3; d_an 2, 1, 1 -> relu(1.5), relu(1.5), relu(2.5)
    # anchor 2 (person 1) has no positive and is left out.
    assert loss.item() == pytest.approx((1.5 + 1.5 + 2.5) / 3)
    assert batch_hard_triplet(x, torch.tensor([0, 1, 2, 3])).item() == 0.0
    far = torch.tensor([[0.0], [0.1], [9.0], [9.1]])
    assert batch_hard_triplet(far, torch.tensor([0, 0, 1, 1]), margin=0.3).item() == 0.0
