"""The mean-expansion layer: Q = u + k * mean_b u(b), exactly as the paper defines it."""

import pytest
import torch

from dqn_atari_meanexp import QNetwork, mean_expansion

F64 = torch.float64  # exact checks in double precision


def test_identity_at_k_zero():
    u = torch.randn(7, 18, dtype=F64)
    assert torch.equal(mean_expansion(u, 0.0), u)


@pytest.mark.parametrize("k", [0.5, 1.0, 18.0])
def test_matches_formula_on_random_inputs(k):
    u = torch.randn(5, 18, dtype=F64)
    expected = torch.stack([u[i] + k * u[i].sum() / 18 for i in range(5)])
    torch.testing.assert_close(mean_expansion(u, k), expected, rtol=0, atol=1e-12)
    # the equivalent form of the paper: (1 + k) * mean + (u - mean)
    m = u.mean(dim=-1, keepdim=True)
    torch.testing.assert_close(mean_expansion(u, k), (1 + k) * m + (u - m), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,n", [(0.0, 4), (1.0, 6), (18.0, 18)])
def test_jacobian_is_identity_plus_k_over_n(k, n):
    u = torch.randn(n, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda x: mean_expansion(x, k), u)
    torch.testing.assert_close(jac, torch.eye(n, dtype=F64) + (k / n) * torch.ones(n, n, dtype=F64), rtol=0, atol=1e-12)


def test_mean_is_over_actions_only():
    u = torch.randn(3, 5, 4, dtype=F64)  # (batch, extra dim, actions)
    out = mean_expansion(u, 2.0)
    torch.testing.assert_close(out[1, 2], u[1, 2] + 2.0 * u[1, 2].mean())


@pytest.mark.parametrize("k", [1.0, 18.0])
def test_constant_value_needs_only_a_small_mean(k):
    """A constant vector c is produced by a u whose mean is c / (1 + k) (the lower-norm target)."""
    c, n = 12.5, 18
    u = torch.full((n,), c / (1 + k), dtype=F64)
    torch.testing.assert_close(mean_expansion(u, k), torch.full((n,), c, dtype=F64), rtol=0, atol=1e-12)
    # and any u with that mean and zero-mean residuals gives c + residual
    r = torch.randn(n, dtype=F64)
    r -= r.mean()
    torch.testing.assert_close(mean_expansion(u + r, k), c + r, rtol=0, atol=1e-12)


def test_network_output_ends_with_the_layer():
    torch.manual_seed(0)
    net = QNetwork(n_actions=6, me_coef=6.0)
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    u = net.network(x.float() / 255.0)
    torch.testing.assert_close(net(x), u + 6.0 * u.mean(dim=1, keepdim=True))
    assert net(x).shape == (2, 6)
