"""FDA's robust entropy (`pgpc_jax/losses/entropy.py`): golden values worked out by hand, the numpy
transcription of the released code (`tests/numpy_fda.py`) on random logits, its constant 2.9444,
and the float64 gradient against central finite differences of the transcription."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.losses.entropy import robust_entropy
from tests import numpy_fda as ref


@functools.cache
def _jitted(**static):
    return jax.jit(functools.partial(robust_entropy, **static))


def _nhwc(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


@pytest.mark.parametrize("num_classes", [2, 5, 19])
@pytest.mark.parametrize("eta", [1.5, 2.0])
def test_uniform_logits_golden(num_classes, eta):
    # Uniform softmax: entropy log C, normalised to 1, so every pixel gives (1 + 1e-8)^eta.
    logits = jnp.full((2, 3, 4, num_classes), 0.7, jnp.float32)
    got = float(_jitted(eta=eta)(logits))
    assert got == pytest.approx((1.0 + 1e-8) ** eta, rel=1e-6)


def test_two_pixels_golden():
    # Pixel 1: logits (0, log 3) -> p = (1/4, 3/4); pixel 2: confident (gap 60) -> entropy ~ 0.
    e1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)  # 0.811278...
    want = 0.5 * ((e1**2 + 1e-8) ** 2 + (0.0 + 1e-8) ** 2)
    logits = jnp.array([[[[0.0, math.log(3.0)], [60.0, 0.0]]]], jnp.float32)  # [1, 1, 2, 2]
    got = float(_jitted(eta=2.0)(logits))
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("eta", [1.5, 2.0])
@pytest.mark.parametrize("num_classes", [3, 19])
def test_matches_numpy_transcription(eta, num_classes):
    rng = np.random.default_rng(num_classes)
    logits = rng.normal(0.0, 3.0, (2, num_classes, 5, 7))  # NCHW, as the reference
    want = ref.robust_entropy(logits, ita=eta)
    got = _jitted(eta=eta)(_nhwc(logits).astype(np.float32))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    # The released constant 2.9444 (for 19 classes) through `normalizer`.
    want_released = ref.robust_entropy(logits, ita=eta, normalizer=2.9444)
    got_released = _jitted(eta=eta, normalizer=2.9444)(_nhwc(logits).astype(np.float32))
    np.testing.assert_allclose(float(got_released), want_released, rtol=2e-5)
    if num_classes != 19:
        assert abs(want_released - want) > 1e-3 * want  # the normaliser matters


def test_bfloat16_logits_compute_in_float32():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (1, 4, 3, 6)).astype(np.float32)
    got = _jitted(eta=2.0)(jnp.asarray(logits, jnp.bfloat16))
    assert got.dtype == jnp.float32
    want = ref.robust_entropy(
        np.moveaxis(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64), -1, 1)
    )
    np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_one_class_needs_a_normalizer():
    with pytest.raises(ValueError, match="2 classes"):
        robust_entropy(jnp.zeros((1, 2, 2, 1)))


@pytest.mark.parametrize("eta", [1.5, 2.0])
def test_gradient_float64_matches_finite_differences(eta):
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 2.0, (2, 4, 3, 5))  # NHWC, 120 entries
    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(functools.partial(robust_entropy, eta=eta))(jnp.asarray(logits)))
    assert grad.dtype == np.float64

    def loss(x):
        return ref.robust_entropy(np.moveaxis(x, -1, 1), ita=eta)

    step = 1e-6
    numeric = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        delta = np.zeros_like(logits)
        delta[index] = step
        numeric[index] = (loss(logits + delta) - loss(logits - delta)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)
    # Softmax is shift-invariant: the gradient sums to zero over the classes of each pixel.
    np.testing.assert_allclose(grad.sum(axis=-1), 0.0, atol=1e-15)
    assert np.abs(grad).max() > 1e-4
