"""The research exercise's transforms (common.norms: whiten, pit, pit-rank): the float64 reference against exact
ZCA, BN and their definitions. Framework-free; the framework layers do not exist yet."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import ndtr

from common.norms import whiten_groups
from common.reference import (
    batch_norm_backward,
    batch_norm_forward,
    complex_step_gradient,
    exact_inverse_sqrt,
    mid_ranks,
    newton_schulz_inverse_sqrt,
    pit_backward,
    pit_forward,
    whiten_forward,
)


def correlated(shape, seed):
    """Values whose channels are correlated (a random mixing of independent ones) and off-centre."""
    rng = np.random.RandomState(seed)
    x = rng.randn(*shape)
    mixing = rng.randn(shape[1], shape[1]) + 2 * np.eye(shape[1])
    return np.moveaxis(np.moveaxis(x, 1, -1) @ mixing.T, -1, 1) + rng.uniform(-3, 3, (1, shape[1]) + shape[2:])


def covariance(values):
    """The biased covariance of (N, C, ...) values over every axis but the channels'."""
    flat = np.moveaxis(values, 1, -1).reshape(-1, values.shape[1])
    centred = flat - flat.mean(axis=0)
    return centred.T @ centred / len(flat)


def test_whitening_groups_are_consecutive_and_the_last_takes_the_rest():
    assert whiten_groups(6, 2) == [(0, 2), (2, 4), (4, 6)]
    assert whiten_groups(7, 3) == [(0, 3), (3, 6), (6, 7)]  # a last group of C mod g channels
    assert whiten_groups(4, 16) == [(0, 4)]  # g above C: one group of every channel
    with pytest.raises(ValueError, match="at least 1 channel"):
        whiten_groups(4, 0)
    with pytest.raises(ValueError, match="at least 1 iteration"):
        newton_schulz_inverse_sqrt(np.eye(2), 0)


@pytest.mark.parametrize("shape, group", [((64, 4, 3, 3), 4), ((200, 6), 3), ((50, 7, 2, 2), 3)])
def test_exact_zca_whitens_each_group_to_the_identity(shape, group):
    x = correlated(shape, 1)
    c = shape[1]
    _, _, _, x_hat = whiten_forward(
        x, np.ones(c), np.zeros(c), np.zeros(c), np.eye(c), training=True, group=group, epsilon=0.0, exact=True
    )
    got = covariance(x_hat)
    for start, stop in whiten_groups(c, group):
        np.testing.assert_allclose(got[start:stop, start:stop], np.eye(stop - start), atol=1e-10)
    if group < c:  # across groups nothing is decorrelated: the transform is per group
        assert np.abs(got[:group, group:]).max() > 1e-3


@pytest.mark.parametrize("kappa", [2, 10, 100])
def test_newton_schulz_converges_to_the_exact_inverse_square_root(kappa):
    """IterNorm's error against the eigendecomposition for T = 1..10 on a 4 x 4 covariance of condition number
    kappa: it falls with every iteration until rounding, and T = 10 is exact to 1e-7 up to kappa = 100. With the
    default T = 5 an ill-conditioned group is only partly whitened (IterNorm's "progressive" whitening)."""
    rng = np.random.RandomState(0)
    q, _ = np.linalg.qr(rng.randn(4, 4))
    cov = (q * np.geomspace(1, 1 / kappa, 4)) @ q.T
    exact = exact_inverse_sqrt(cov)
    errors = [np.linalg.norm(newton_schulz_inverse_sqrt(cov, t) - exact) / np.linalg.norm(exact) for t in range(1, 11)]
    above = [e for e in errors if e > 1e-10]
    assert all(b < a for a, b in zip(above, above[1:])), errors
    assert errors[-1] < 1e-7 and errors[0] > 0.1, errors


@settings(max_examples=15, deadline=None)
@given(
    shape=st.sampled_from([(8, 3, 4, 4), (16, 5), (6, 2, 3, 3)]),
    training=st.booleans(),
    iterations=st.integers(1, 10),
    seed=st.integers(0, 1000),
)
def test_whiten_with_groups_of_one_is_bn_bit_for_bit(shape, training, iterations, seed):
    rng = np.random.RandomState(seed)
    x, c = correlated(shape, seed), shape[1]
    gamma, beta = rng.uniform(0.5, 2, c), rng.randn(c)
    mean, var = rng.randn(c), rng.uniform(0.5, 2, c)
    y, new_mean, new_cov, _ = whiten_forward(
        x, gamma, beta, mean, np.diag(var), training=training, group=1, iterations=iterations
    )
    want, want_mean, want_var, _ = batch_norm_forward(x, gamma, beta, mean, var, training=training)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(new_mean, want_mean)
    np.testing.assert_array_equal(np.diag(new_cov), want_var)
    assert np.count_nonzero(new_cov - np.diag(np.diag(new_cov))) == 0  # no covariance across groups of one


def test_whitens_running_statistics_blend_each_groups_covariance_as_bn_blends_the_variance():
    x, c = correlated((32, 4, 2, 2), 3), 4
    running = np.eye(c) * 2.0
    _, new_mean, new_cov, _ = whiten_forward(
        x, np.ones(c), np.zeros(c), np.zeros(c), running, training=True, group=2, decay=0.75
    )
    batch = covariance(x)
    np.testing.assert_allclose(new_cov[:2, :2], 0.75 * running[:2, :2] + 0.25 * batch[:2, :2], rtol=1e-12)
    np.testing.assert_allclose(new_cov[2:, 2:], 0.75 * running[2:, 2:] + 0.25 * batch[2:, 2:], rtol=1e-12)
    assert not new_cov[:2, 2:].any()  # outside the groups: untouched
    np.testing.assert_allclose(new_mean, 0.25 * x.mean(axis=(0, 2, 3)), rtol=1e-12)
    # eval mode whitens with the running statistics
    y, *_ = whiten_forward(x, np.ones(c), np.zeros(c), new_mean, new_cov, training=False, group=2, iterations=10)
    block = new_cov[:2, :2] + 1e-5 * np.eye(2)
    want = np.einsum("ij,njhw->nihw", exact_inverse_sqrt(block), x[:, :2] - new_mean[:2].reshape(1, 2, 1, 1))
    np.testing.assert_allclose(y[:, :2], want, rtol=1e-9, atol=1e-12)


def test_the_complex_step_gradient_of_whiten_with_groups_of_one_is_bns_backward():
    """The derivative the framework layers will be checked against: exact to rounding where BN's backward is
    known."""
    x, c = correlated((4, 2, 2, 2), 5), 2
    gamma, beta, dy = np.array([1.5, 0.5]), np.array([0.1, -0.2]), np.random.RandomState(2).randn(4, 2, 2, 2)

    def loss(z):
        return np.sum(dy * whiten_forward(z, gamma, beta, np.zeros(c), np.eye(c), training=True, group=1)[0])

    _, _, _, cache = batch_norm_forward(x, gamma, beta, np.zeros(c), np.ones(c), training=True)
    np.testing.assert_allclose(
        complex_step_gradient(loss, x), batch_norm_backward(dy, cache)[0], rtol=1e-10, atol=1e-13
    )


@pytest.mark.parametrize("training", [True, False])
def test_pit_maps_bns_normalised_values_through_the_normal_cdf(training):
    x, c = correlated((16, 3, 2, 2), 7) * 4, 3
    gamma, beta = np.array([2.0, 1.0, 0.5]), np.array([0.0, 1.0, -1.0])
    mean, var = np.zeros(c), np.full(c, 4.0)
    y, new_mean, new_var, u, _ = pit_forward(x, gamma, beta, mean, var, training=training)
    _, want_mean, want_var, cache = batch_norm_forward(x, np.ones(c), np.zeros(c), mean, var, training=training)
    # in training mode |x_hat| <= sqrt(m - 1) (here sqrt(63)), so Phi stays inside (0, 1) in float64; in eval mode
    # a value 8.3 running deviations above the mean rounds to 1 (the values here reach it)
    assert (((u > 0) & (u < 1)) if training else ((u >= 0) & (u <= 1))).all()
    np.testing.assert_array_equal(u, ndtr(cache[0]))
    np.testing.assert_array_equal(y, gamma.reshape(1, -1, 1, 1) * u + beta.reshape(1, -1, 1, 1))
    np.testing.assert_array_equal(new_mean, want_mean)
    np.testing.assert_array_equal(new_var, want_var)


def test_pit_backward_against_central_differences():
    x, c = correlated((6, 2, 2, 2), 9), 2
    gamma, beta, dy = np.array([1.5, 0.7]), np.array([0.2, 0.0]), np.random.RandomState(4).randn(6, 2, 2, 2)

    def loss(z):
        return np.sum(dy * pit_forward(z, gamma, beta, np.zeros(c), np.ones(c), training=True)[0])

    _, _, _, _, cache = pit_forward(x, gamma, beta, np.zeros(c), np.ones(c), training=True)
    dx, dgamma, dbeta = pit_backward(dy, cache)
    numeric = np.zeros_like(x)
    for k in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[k] = 1e-6
        numeric[k] = (loss(x + step) - loss(x - step)) / 2e-6
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)
    u = ndtr(cache[0][0])
    np.testing.assert_allclose(dgamma, (dy * u).sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(dbeta, dy.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_pit_rank_is_a_permutation_of_the_mid_rank_grid_with_ties_sharing_their_mean_rank():
    rng = np.random.RandomState(11)
    x = rng.randint(0, 5, size=(10, 3, 2, 2)).astype(np.float64)  # many ties
    x[:, 2] = rng.randn(10, 2, 2)  # one channel without ties
    c = 3
    _, _, _, u, _ = pit_forward(x, np.ones(c), np.zeros(c), np.zeros(c), np.ones(c), training=True, rank=True)
    m = 10 * 2 * 2
    grid = (np.arange(1, m + 1) - 0.5) / m
    for channel in range(c):
        values, ranks = x[:, channel].ravel(), u[:, channel].ravel()
        assert ranks.sum() == pytest.approx(grid.sum(), rel=1e-12)  # mid-ranks keep the grid's sum
        for value in np.unique(values):  # tied values share one rank: the mean of the grid points they span
            tied = ranks[values == value]
            below = np.sum(values < value)
            assert np.all(tied == tied[0]) and tied[0] == pytest.approx(grid[below : below + len(tied)].mean())
    np.testing.assert_array_equal(np.sort(u[:, 2].ravel()), grid)  # without ties: the grid itself
    np.testing.assert_array_equal(u, mid_ranks(x))
    # eval mode is pit's: the running statistics through the normal CDF
    _, _, _, u_eval, _ = pit_forward(x, np.ones(c), np.zeros(c), np.zeros(c), np.ones(c), training=False, rank=True)
    np.testing.assert_allclose(u_eval, ndtr(x / np.sqrt(1 + 1e-5)), rtol=1e-14)
