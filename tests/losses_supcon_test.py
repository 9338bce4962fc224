"""The paired supervised contrast (`pgpc_jax/losses/supcon.py`): golden values worked by hand,
a loop-by-loop numpy version of its formula on random inputs with invalid samples, and its float64
gradient against central finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.losses.supcon import paired_supcon


def _numpy_supcon(a, b, labels, valid, tau, symmetric):
    def direction(a, b):
        per_anchor = []
        for i in range(len(a)):
            if not valid[i]:
                continue
            cands = [j for j in range(len(b)) if valid[j]]
            logits = {j: float(a[i] @ b[j]) / tau for j in cands}
            lse = math.log(sum(math.exp(v) for v in logits.values()))
            positives = [j for j in cands if labels[j] == labels[i]]
            if positives:
                per_anchor.append(-sum(logits[p] - lse for p in positives) / len(positives))
        return sum(per_anchor) / max(len(per_anchor), 1)

    forward = direction(a, b)
    return 0.5 * (forward + direction(b, a)) if symmetric else forward


def test_golden_values():
    eye = jnp.eye(2)
    log1pe = math.log(1 + math.e)
    # Two classes, each anchor's one positive is its own pixel in the other view.
    got = paired_supcon(eye, eye, jnp.array([0, 1]), jnp.array([True, True]), 1.0)
    np.testing.assert_allclose(got, log1pe - 1, rtol=1e-6)
    # One class: both pixels are positives of each anchor.
    got = paired_supcon(eye, eye, jnp.array([0, 0]), jnp.array([True, True]), 1.0, False)
    np.testing.assert_allclose(got, log1pe - 0.5, rtol=1e-6)
    # No valid sample: 0, not NaN.
    assert float(paired_supcon(eye, eye, jnp.array([0, 0]), jnp.array([False, False]))) == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_the_formula_with_invalid_samples(symmetric):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 12, 5))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    labels = rng.integers(0, 4, 12)
    valid = rng.random(12) > 0.3
    want = _numpy_supcon(a, b, labels, valid, 0.2, symmetric)
    with jax.enable_x64(True):
        got = paired_supcon(jnp.asarray(a), jnp.asarray(b), labels, valid, 0.2, symmetric)
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_float64_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 8, 3))
    labels, valid = rng.integers(0, 3, 8), rng.random(8) > 0.2

    def loss(a, b):
        return paired_supcon(a, b, labels, valid, 0.5)

    with jax.enable_x64(True):
        ga, gb = jax.grad(loss, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
        for grad, which in ((ga, 0), (gb, 1)):
            direction = rng.normal(size=a.shape)
            h = 1e-6
            plus, minus = [a, b], [a, b]
            plus[which] = plus[which] + h * direction
            minus[which] = minus[which] - h * direction
            numeric = (loss(*map(jnp.asarray, plus)) - loss(*map(jnp.asarray, minus))) / (2 * h)
            np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), numeric, rtol=1e-6)
    # Invalid samples get no gradient.
    assert np.all(np.asarray(ga)[~valid] == 0) and np.all(np.asarray(gb)[~valid] == 0)
