"""The 4-direction IRNN: reduction to ReLU, a naive reference, and its receptive field."""

import pytest
import torch

from model import FourDirectionRecurrence, IRNNLayer, StackedIRNN


def naive_recurrence(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cell by cell, direction by direction: the definition, with no batching at all."""
    b, h, rows, cols = x.shape
    out = torch.zeros(b, 4 * h, rows, cols, dtype=x.dtype)
    for n in range(b):
        for d, (axis, reverse) in enumerate([(1, False), (1, True), (0, False), (0, True)]):
            w = weight[d]
            lines = rows if axis == 1 else cols
            length = cols if axis == 1 else rows
            for line in range(lines):
                state = torch.zeros(h, dtype=x.dtype)
                order = range(length - 1, -1, -1) if reverse else range(length)
                for t in order:
                    i, j = (line, t) if axis == 1 else (t, line)
                    state = torch.relu(w @ state + x[n, :, i, j])
                    out[n, d * h:(d + 1) * h, i, j] = state
    return out


def test_identity_initialised():
    rec = FourDirectionRecurrence(5)
    assert torch.equal(rec.weight, torch.eye(5).repeat(4, 1, 1))


def test_zero_recurrent_weights_reduce_to_relu():
    rec = FourDirectionRecurrence(6)
    with torch.no_grad():
        rec.weight.zero_()
    x = torch.randn(3, 6, 5, 4)
    assert torch.equal(rec(x), torch.relu(x).repeat(1, 4, 1, 1))


@pytest.mark.parametrize("shape", [(2, 5, 4, 4), (3, 4, 6, 3), (1, 3, 2, 7)])
def test_matches_naive_loop(shape):
    torch.manual_seed(1)
    rec = FourDirectionRecurrence(shape[1])
    with torch.no_grad():
        rec.weight.add_(0.3 * torch.randn_like(rec.weight))
    x = torch.randn(*shape)
    got = rec(x)
    ref = naive_recurrence(x.double(), rec.weight.detach().double())
    rel = (got.double() - ref).norm() / ref.norm()
    assert rel < 1e-5
    # and the directions are where the docstring says: left->right cell (0, 0) saw only itself
    assert torch.allclose(got[:, :shape[1], :, 0], torch.relu(x[:, :, :, 0]))


def _dependency(module: torch.nn.Module, i: int, j: int, shape=(1, 4, 5, 6)) -> torch.Tensor:
    """Which input cells the output cell (i, j) depends on, by autograd."""
    torch.manual_seed(0)
    with torch.no_grad():  # positive weights and inputs: no ReLU is ever cut off
        for p in module.parameters():
            p.uniform_(0.05, 0.5)
    x = torch.rand(*shape, requires_grad=True)
    module(x)[0, :, i, j].sum().backward()
    return x.grad[0].abs().sum(0) > 0


def test_one_layer_sees_its_row_and_column():
    layer = IRNNLayer(channels=4, hidden=3, dropout=0.0).eval()
    for i, j in [(0, 0), (2, 3), (4, 5)]:
        dep = _dependency(layer, i, j)
        expected = torch.zeros(5, 6, dtype=torch.bool)
        expected[i, :] = True
        expected[:, j] = True
        assert torch.equal(dep, expected)


def test_two_layers_see_every_cell():
    stack = StackedIRNN(channels=4, hidden=3, layers=2, dropout=0.0).eval()
    for i, j in [(0, 0), (2, 3), (4, 5)]:
        assert _dependency(stack, i, j).all()


def test_fused_core_equals_layers_in_sequence():
    torch.manual_seed(2)
    stack = StackedIRNN(channels=8, hidden=4, layers=3, dropout=0.5).eval()
    x = torch.randn(2, 8, 5, 3)
    sequential = x
    for layer in stack.layers:
        sequential = layer(sequential)
    assert torch.allclose(stack(x), sequential, atol=1e-5)


def test_dropout_drops_whole_hidden_maps_in_training():
    torch.manual_seed(0)
    stack = StackedIRNN(channels=8, hidden=16, layers=1, dropout=0.5)
    x = torch.rand(4, 16, 3, 5) + 0.1  # after in_proj: positive, so no hidden map is all zero
    kept = stack.eval().core(x)
    dropped = stack.train().core(x)
    ratio = (dropped / kept).flatten(2)  # per sample and hidden map: all 0 or all 2
    assert ((ratio == 0).all(-1) | torch.isclose(ratio, torch.tensor(2.0)).all(-1)).all()
    assert 0.2 < (ratio[..., 0] == 0).float().mean() < 0.8
