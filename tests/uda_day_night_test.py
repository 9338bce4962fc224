"""SePiCo's day-night pseudo-label mix and class weights against hand values and a numpy
transcription of the released logic (per-range weight tensors filled in place, NCHW)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.uda import day_night


def _numpy_class_weights(frequencies, strength):
    # torch.std is unbiased: divide by n - 1.
    log_f = np.log(np.asarray(frequencies, np.float64))
    n = log_f.size
    std = np.sqrt(((log_f - log_f.mean()) ** 2).sum() / (n - 1))
    return (log_f.mean() - log_f) / std * strength + 1.0


def _numpy_mix(day_nchw, night_nchw, class_weight, day_ratio, ranges):
    """The released order: a zero weight tensor, per class range a tensor of 1 - day_ratio set to
    day_ratio where the day probability > 0.4, then the blend, then the class weights."""
    mix_weight = np.zeros_like(night_nchw)
    for start, stop in ranges:
        weight = np.ones_like(day_nchw[:, start:stop]) * (1 - day_ratio)
        weight[day_nchw[:, start:stop] > 0.4] = day_ratio
        mix_weight[:, start:stop] = weight
    mixed = mix_weight * day_nchw + (1 - mix_weight) * night_nchw
    if class_weight is not None:
        mixed = mixed * np.asarray(class_weight)[None, :, None, None]
    return mixed


def _softmax(rng, shape):
    logits = rng.normal(size=shape) * 2.0
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_class_weights_formula_and_unbiased_std():
    f = day_night.DARK_ZURICH_CLASS_FREQUENCIES
    assert f.shape == (19,)
    np.testing.assert_allclose(
        day_night.class_weights(), _numpy_class_weights(f, 0.05), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        day_night.class_weights(strength=0.16), _numpy_class_weights(f, 0.16), rtol=1e-6
    )
    # Rarest class (motorcycle, 17) gets the largest weight, road the smallest; mean is 1.
    w = np.asarray(day_night.class_weights())
    assert w.argmax() == 17 and w.argmin() == 0
    np.testing.assert_allclose(w.mean(), 1.0, atol=1e-6)
    # The weights' deviations from 1 have (unbiased) std = strength; ddof=0 would differ.
    np.testing.assert_allclose(np.std(w - 1, ddof=1), 0.05, rtol=1e-5)
    assert not np.allclose(day_night.class_weights(ddof=0), w, rtol=0, atol=1e-4)


def test_class_weights_hand_values():
    # log f = (0, 1, 2): mean 1, unbiased std 1 -> (1 - log f) * s + 1; biased std sqrt(2/3).
    f = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(day_night.class_weights(f, 0.5), [1.5, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(
        day_night.class_weights(f, 0.5, ddof=0), 1 + np.array([1, 0, -1]) * 0.5 * np.sqrt(3 / 2),
        rtol=1e-6,
    )  # fmt: skip


def test_mix_hand_values():
    # One pixel, classes 0 (road, insensitive), 5 (pole, sensitive), 9 (terrain, insensitive).
    p_day = np.zeros((1, 1, 1, 19), np.float32)
    p_night = np.zeros((1, 1, 1, 19), np.float32)
    p_day[..., [0, 5, 9]] = [0.5, 0.3, 0.2]
    p_night[..., [0, 5, 9]] = [0.1, 0.6, 0.3]
    mixed = np.asarray(day_night.mix_day_night_probs(p_day, p_night))
    # road: day 0.5 > 0.4 -> 0.8*0.5 + 0.2*0.1; pole: night only; terrain: 0.2*0.2 + 0.8*0.3.
    np.testing.assert_allclose(mixed[0, 0, 0, [0, 5, 9]], [0.42, 0.6, 0.28], rtol=1e-6)
    assert np.all(mixed[..., [1, 2, 3, 4, 6, 7, 8, 10, 11]] == 0)
    # The threshold is strict: exactly 0.4 is not confident.
    p_day[..., 0] = 0.4
    mixed = np.asarray(day_night.mix_day_night_probs(p_day, p_night))
    np.testing.assert_allclose(mixed[0, 0, 0, 0], 0.2 * 0.4 + 0.8 * 0.1, rtol=1e-6)
    # Class weights multiply after the mix, with no renormalisation.
    w = np.arange(1, 20, dtype=np.float32)
    weighted = np.asarray(day_night.mix_day_night_probs(p_day, p_night, w))
    np.testing.assert_allclose(weighted, mixed * w, rtol=1e-6)


def test_mix_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    p_day, p_night = _softmax(rng, (2, 5, 7, 19)), _softmax(rng, (2, 5, 7, 19))
    p_day[0, 0, 0, :5] = [0.41, 0.39, 0.05, 0.05, 0.05]  # both sides of the threshold
    cw = np.asarray(day_night.class_weights())
    for weights, ratio, ranges in (
        (cw, 0.8, ((0, 5), (8, 11))),
        (None, 0.8, ((0, 5), (8, 11))),
        (cw, 0.6, ((0, 3),)),
    ):
        got = jax.jit(day_night.mix_day_night_probs, static_argnums=(3, 4, 5))(
            p_day, p_night, weights, ratio, 0.4, ranges
        )
        want = _numpy_mix(
            p_day.transpose(0, 3, 1, 2), p_night.transpose(0, 3, 1, 2), weights, ratio, ranges
        ).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


def test_mix_changes_the_argmax_towards_confident_day_classes():
    # Night says car (13), day says road (0) confidently: road wins (0.8*0.9 > car's night 0.5).
    p_day = np.zeros((1, 1, 1, 19), np.float32)
    p_night = np.zeros((1, 1, 1, 19), np.float32)
    p_day[..., 0] = 0.9
    p_day[..., 13] = 0.1
    p_night[..., 0] = 0.3
    p_night[..., 13] = 0.5
    mixed = day_night.mix_day_night_probs(p_day, p_night, day_night.class_weights())
    assert int(jnp.argmax(mixed[0, 0, 0])) == 0


@pytest.mark.parametrize("shape", [(19,), (2, 3, 4, 19)])
def test_reweight_test_probs(shape):
    rng = np.random.default_rng(1)
    probs = rng.random(shape).astype(np.float32)
    got = np.asarray(day_night.reweight_test_probs(probs))
    want = probs * _numpy_class_weights(day_night.DARK_ZURICH_CLASS_FREQUENCIES, 0.16)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    w = np.linspace(0.5, 1.5, 19, dtype=np.float32)
    np.testing.assert_allclose(day_night.reweight_test_probs(probs, w), probs * w, rtol=1e-6)


def test_pixel_class_weights_give_torch_class_weighted_cross_entropy():
    from pgpc_jax.losses.segmentation import cross_entropy

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 6, 19)).astype(np.float32)
    labels = rng.integers(0, 19, (2, 4, 6)).astype(np.int32)
    labels[0, 0, :3] = 255
    w = np.asarray(day_night.class_weights())
    pixel = np.asarray(day_night.pixel_class_weights(labels, w))
    np.testing.assert_array_equal(pixel[0, 0, :3], 1.0)
    np.testing.assert_allclose(pixel[1], w[labels[1]], rtol=0)
    # Per pixel w[y] * nll, ignored pixels 0, mean over all B*H*W (mmseg's reduction).
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    safe = np.where(labels == 255, 0, labels)
    nll = -np.take_along_axis(log_p, safe[..., None], -1)[..., 0] * (labels != 255)
    want = (nll * w[safe]).mean()
    got = cross_entropy(logits, labels, day_night.pixel_class_weights(labels, w))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
