"""FDA's per-class pseudo-label thresholds (`pgpc_jax/uda/class_thresholds.py`): hand-made
confidence lists (the 66 % index with numpy's half-to-even rounding, the 0.9 cap, absent
classes, the one-pixel class the release cannot index), chunked = whole, against a numpy
transcription of `getSudoLabel_multi.py` (`tests/numpy_fda_thresholds.py`) on random
predictions, the exact thresholds from a histogram and one more pass (hand-made with ties, and
on random predictions: equal to the thresholds over all confidences), the 255 rule on a
hand-made case, and the histogram approximation's bounds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.uda import class_thresholds as ct
from tests import numpy_fda_thresholds as ref


def _hand_made():
    """Labels and float32 confidences of 6 classes, shuffled, with out-of-range labels."""
    groups = {
        # n = 25: 25 * 0.66 = 16.5 rounds (half to even) to 16: the 17th smallest, 0.17.
        0: np.arange(1, 26) / 100.0,
        # n = 3: index round(1.98) = 2, the largest, 0.99, capped at 0.9.
        1: np.array([0.97, 0.99, 0.95]),
        # n = 2: index round(1.32) = 1: 0.5.
        3: np.array([0.5, 0.3]),
        # n = 1: the release indexes past the end; the single value here.
        4: np.array([0.42]),
        # n = 75: 49.5 rounds (to even) up to 50: 0.50 of the values 0.00, 0.01, ..., 0.74.
        5: np.arange(75) / 100.0,
    }
    labels = np.concatenate([np.full(len(v), c) for c, v in groups.items()] + [[255, -1, 6]])
    conf = np.concatenate(list(groups.values()) + [[0.0, 0.0, 0.0]]).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(labels))
    return labels[order], conf[order]


_HAND_MADE_THRESHOLDS = np.float32([0.17, 0.9, 0.0, 0.5, 0.42, 0.5]).astype(np.float64)
_HAND_MADE_THRESHOLDS[1] = 0.9  # the cap in float64, not float32(0.9)


def test_order_index():
    assert ct.order_index(25) == 16 and ct.order_index(75) == 50  # half to even
    assert ct.order_index(3) == 2 and ct.order_index(2) == 1 and ct.order_index(100) == 66
    assert ct.order_index(1) == 0  # the release's 1 is past the end
    np.testing.assert_array_equal(ct.order_index(np.array([1, 2, 25, 1000])), [0, 1, 16, 660])


def test_thresholds_of_hand_made_confidences():
    labels, conf = _hand_made()
    got = ct.class_thresholds(labels, conf, 6)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, _HAND_MADE_THRESHOLDS)
    # The class absent from the data (2) gets `absent`; the cap and fraction are parameters.
    # fraction 0.5: indices round(12.5) = 12, round(1.5) = 2, round(1.0) = 1, 0, round(37.5) = 38.
    other = ct.class_thresholds(labels, conf, 6, fraction=0.5, cap=0.95, absent=-1.0)
    want = np.float32([0.13, 0.0, -1.0, 0.5, 0.42, 0.38]).astype(np.float64)
    want[1] = 0.95
    np.testing.assert_array_equal(other, want)
    # The transcription agrees where the release runs, and fails on the one-pixel class.
    keep = labels != 4
    np.testing.assert_array_equal(
        ref.thresholds(labels[keep], conf[keep], 6), np.where(np.arange(6) == 4, 0.0, got)
    )
    with pytest.raises(IndexError):
        ref.thresholds(labels, conf, 6)


def test_chunks_equal_whole():
    labels, conf = _hand_made()
    pieces = np.array_split(np.arange(len(labels)), 4)
    chunks = [(labels[i].reshape(1, -1), conf[i].reshape(1, -1)) for i in pieces]
    np.testing.assert_array_equal(
        ct.class_thresholds_from_chunks(chunks, 6), ct.class_thresholds(labels, conf, 6)
    )
    with pytest.raises(ValueError, match="differ"):
        ct.class_thresholds(labels, conf[:-1], 6)


def _hand_made_with_ties():
    """Labels and float32 confidences of 5 classes (class 2 absent), shuffled."""
    groups = {
        0: np.arange(1, 26) / 100.0,  # n = 25: index round(16.5) = 16 (half to even): 0.17
        1: np.array([0.97, 0.99, 0.95]),  # index 2: 0.99, capped at 0.9
        3: np.array([0.5, 0.3, 0.3, 0.8]),  # index round(2.64) = 3: 0.8 (ties below it)
        4: np.full(10, 0.25),  # all equal: index 7: 0.25
    }
    labels = np.concatenate([np.full(len(v), c) for c, v in groups.items()])
    conf = np.concatenate(list(groups.values())).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(labels))
    return labels[order], conf[order]


def test_exact_thresholds_of_a_hand_made_confidence_list():
    labels, conf = _hand_made_with_ties()
    chunks = [(labels[:20], conf[:20]), (labels[20:], conf[20:])]
    histogram = sum(ct.class_histogram(a, b, 5) for a, b in chunks)
    got = ct.exact_thresholds(histogram, lambda: chunks)
    want = np.float32([0.17, 0.9, 0.0, 0.8, 0.25]).astype(np.float64)
    want[1] = 0.9  # the cap, in float64
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, ct.class_thresholds(labels, conf, 5))
    # Another quantile and cap: index round(12.5) = 12 -> 0.13; class 1's 0.99 capped at 0.98.
    other = ct.exact_thresholds(histogram, lambda: chunks, quantile=0.5, cap=0.98)
    np.testing.assert_array_equal(
        other, ct.class_thresholds(labels, conf, 5, fraction=0.5, cap=0.98)
    )
    assert other[0] == np.float32(0.13) and other[1] == 0.98
    # The 255 rule: below its class's threshold (strictly) -> ignored.
    pseudo = np.asarray(ct.apply_thresholds(labels, conf, got))
    keep = conf.astype(np.float64) >= got[labels]  # the release compares in float64
    np.testing.assert_array_equal(pseudo, np.where(keep, labels, 255))
    assert (pseudo == 0).sum() == 25 - 16 and (pseudo == 1).sum() == 3 and (pseudo == 4).sum() == 10


def test_exact_thresholds_equal_the_released_ones_on_random_predictions():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, (4, 50, 60))
    # Coarse values (many ties, some over the cap) and fine ones.
    conf = np.where(
        rng.random(labels.shape) < 0.5,
        rng.integers(0, 20, labels.shape) / 19.0,
        rng.random(labels.shape),
    ).astype(np.float32)
    labels[labels == 5] = 4  # class 5 absent
    histogram = sum(ct.class_histogram(a, b, 6) for a, b in zip(labels, conf))
    assert histogram.shape == (6, ct.NUM_BINS) and histogram.sum() == labels.size
    got = ct.exact_thresholds(histogram, lambda: zip(labels, conf))
    np.testing.assert_array_equal(got, ct.class_thresholds(labels, conf, 6))
    for quantile, cap in ((0.9, 0.95), (0.1, 0.5), (1.0, 1.0), (0.0, 0.9)):
        got = ct.exact_thresholds(histogram, lambda: zip(labels, conf), quantile=quantile, cap=cap)
        want = ct.class_thresholds(labels, conf, 6, fraction=quantile, cap=cap)
        np.testing.assert_array_equal(got, want)


def _random_predictions(seed, shape=(3, 6, 7), num_classes=5):
    """float32 softmax outputs of three models [3, N, H, W, C] and their (label, prob)."""
    rng = np.random.default_rng(seed)
    # Three models that mostly agree; classes 0 and 1 are predicted confidently (their
    # thresholds hit the 0.9 cap), the others less so.
    base = rng.normal(0.0, 1.0, (*shape, num_classes))
    base[..., :2] *= 6.0
    logits = (base[None] + rng.normal(0.0, 0.5, (3, *shape, num_classes))).astype(np.float32)
    logits[..., num_classes - 1] -= 50.0  # the last class is never predicted: absent
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    label, prob = ref.multiband_prediction(probs[0], probs[1], probs[2])
    assert prob.dtype == np.float32
    return probs, label, prob


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_and_pseudo_labels_match_transcription(seed):
    probs, label, prob = _random_predictions(seed)
    counts = np.bincount(label.ravel(), minlength=5)
    assert counts[4] == 0 and counts[:4].min() >= 2  # an absent class; no one-pixel class
    # Ties and the cap's edge: a few exact repeats and pixels at float32(0.9).
    prob = prob.copy()
    prob.flat[::11] = prob.flat[0]
    prob.flat[5::13] = np.float32(0.9)
    want = ref.thresholds(label, prob, 5)
    got = ct.class_thresholds(label, prob, 5)
    np.testing.assert_array_equal(got, want)
    assert got[4] == 0.0 and (got[:2] == 0.9).all() and (0.0 < got[2:4]).all()
    assert (got[2:4] < 0.9).all()

    pseudo = np.asarray(ct.apply_thresholds(label, prob, got))
    expected = ref.pseudo_labels(label, prob, want, 5)
    np.testing.assert_array_equal(pseudo, expected.astype(np.int32))
    kept = pseudo != 255
    # The rule did something: about a third of each class survives, and not every pixel.
    assert 0 < kept.sum() < kept.size
    # Jitted, with the thresholds rounded up to float32 beforehand.
    jitted = jax.jit(ct.apply_thresholds)(label, prob, ct.round_up_thresholds(got))
    np.testing.assert_array_equal(np.asarray(jitted), pseudo)


def test_multiband_prediction_matches_transcription():
    probs, label, prob = _random_predictions(3)
    got_label, got_prob = ct.multiband_prediction(jnp.asarray(probs))
    assert got_label.dtype == jnp.int32 and got_label.shape == label.shape
    np.testing.assert_allclose(np.asarray(got_prob), prob, rtol=1e-6)
    # Same argmax wherever the top two classes are not within float32 rounding.
    mean = 0.3333 * probs[0] + 0.3333 * probs[1] + (1.0 - 0.6666) * probs[2]
    top2 = np.sort(mean, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(got_label)[clear], label[clear])
    # Explicit weights: one model alone.
    one_label, one_prob = ct.multiband_prediction(jnp.asarray(probs), (0.0, 1.0, 0.0))
    np.testing.assert_array_equal(np.asarray(one_label), probs[1].argmax(-1))
    np.testing.assert_allclose(np.asarray(one_prob), probs[1].max(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        ct.multiband_prediction(jnp.asarray(probs), (0.5, 0.5))


def test_apply_thresholds_hand_made():
    labels = np.array([[0, 1, 2, 255], [3, 0, 1, -1]])
    conf = np.float32([[0.49, 0.9, 0.0, 0.1], [0.3, 0.5, 0.95, 0.0]])
    thresholds = np.array([0.5, 0.9, 0.0, 0.3])
    got = np.asarray(ct.apply_thresholds(labels, conf, thresholds))
    # 0.49 < 0.5: dropped. float32(0.9) < 0.9 in float64: dropped, as in the release. Not
    # below the threshold, kept: 0.0 vs 0.0, 0.5 vs 0.5, float32(0.3) > 0.3. Labels out of
    # range (255, -1): unchanged.
    np.testing.assert_array_equal(got, [[255, 255, 2, 255], [3, 0, 1, -1]])
    assert got.dtype == np.int32
    # Thresholds already in float32 are compared as given: float32(0.9) is then kept.
    got32 = np.asarray(ct.apply_thresholds(labels, conf, jnp.float32(thresholds), ignore=99))
    np.testing.assert_array_equal(got32, [[99, 1, 2, 255], [3, 0, 1, -1]])


def test_round_up_thresholds():
    t = np.array([0.0, 0.9, 0.5, 0.3, 1.0 / 3.0])
    up = ct.round_up_thresholds(t)
    assert up.dtype == np.float32
    assert (up.astype(np.float64) >= t).all()
    np.testing.assert_array_equal(up[[0, 2]], [0.0, 0.5])  # exactly representable: unchanged
    # The next float32 below is below t: up is the smallest float32 not below t.
    below = np.nextafter(up, np.float32(-np.inf))
    assert (below.astype(np.float64) < t).all()


@functools.cache
def _histogram(num_classes, num_bins):
    return jax.jit(
        functools.partial(ct.confidence_histogram, num_classes=num_classes, num_bins=num_bins)
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_thresholds_bound_the_exact_ones(seed):
    _, label, prob = _random_predictions(seed, shape=(4, 8, 9))
    label = label.copy()
    label[0, 0, :3] = 255  # not counted
    num_bins = 256
    # Summed over chunks on the host, as over a dataset.
    hist = sum(np.asarray(_histogram(5, num_bins)(*chunk), np.int64) for chunk in zip(label, prob))
    assert hist.shape == (5, num_bins)
    np.testing.assert_array_equal(hist.sum(1), np.bincount(label[label < 5], minlength=5))
    # Uncapped, the order statistic is within one bin below the exact one.
    approx = ct.thresholds_from_histogram(hist, cap=2.0)
    exact = ct.class_thresholds(label, prob, 5, cap=2.0)
    present = hist.sum(1) > 0
    assert not present[4] and approx[4] == 0.0
    assert (approx[present] <= exact[present]).all()
    assert (exact[present] < approx[present] + 1.0 / num_bins).all()
    assert (exact[present] > approx[present]).any()  # an approximation indeed
    # Capped, approximate thresholds keep every pixel the exact ones keep, and a few more.
    approx = ct.thresholds_from_histogram(hist)
    np.testing.assert_array_equal(approx[:2], [0.9, 0.9])
    kept_exact = np.asarray(ct.apply_thresholds(label, prob, ct.class_thresholds(label, prob, 5)))
    kept_exact = kept_exact != 255
    kept_approx = np.asarray(ct.apply_thresholds(label, prob, approx)) != 255
    assert (kept_approx >= kept_exact).all() and kept_exact.sum() > 0
    # The extra pixels lie in the bin of each class's threshold.
    bins = np.minimum(np.floor(approx * num_bins).astype(int), num_bins - 1)
    assert (kept_approx & ~kept_exact).sum() <= hist[np.arange(5), bins].sum()


def test_histogram_bins_hand_made():
    labels = np.array([0, 0, 0, 1, 1, 7])
    conf = np.float32([0.0, 0.25, 1.0, 0.49, 0.5, 0.6])
    hist = np.asarray(ct.confidence_histogram(labels, conf, 2, num_bins=4))
    np.testing.assert_array_equal(hist, [[1, 1, 0, 1], [0, 1, 1, 0]])
    # Class 0: n = 3, index 2 (the 1.0, last bin, lower edge 0.75); class 1: n = 2, index 1
    # (0.5, bin [0.5, 0.75)).
    np.testing.assert_array_equal(ct.thresholds_from_histogram(hist, cap=1.0), [0.75, 0.5])
    np.testing.assert_array_equal(ct.thresholds_from_histogram(hist), [0.75, 0.5])
    np.testing.assert_array_equal(ct.thresholds_from_histogram(hist, cap=0.6), [0.6, 0.5])
