"""PiPa's pixel contrast: the loss against a numpy transcription of the released `_contrastive`
(`tests/numpy_pipa.py`) with and without padding, a golden value worked out by hand, float64
finite-difference gradients; the hard-anchor sampler against the released rule on a hand-made
label / prediction map (fallbacks, the pixel threshold, the ignore-label quirk), against the
transcription of `_hard_anchor_sampling` given the same permutations, and its pick frequencies."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.losses import pipa
from tests import numpy_pipa as ref

_loss = jax.jit(pipa.pixel_contrastive, static_argnames=("temperature", "base_temperature"))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# The contrast


@pytest.mark.parametrize("tau, base", [(0.1, 0.07), (0.5, 0.07)])
def test_golden_two_classes_two_views(tau, base):
    # Class 0: a = (1, 0), b = (.6, .8); class 1: c = (-1, 0), d = (0, -1). Each sample has one
    # positive p and two negatives, so l = (tau / base) * log(1 + sum_n exp((s_n - s_p) / tau)):
    #   a: s_p = a.b = .6, negatives a.c = -1, a.d = 0
    #   b: s_p = .6, negatives b.c = -.6, b.d = -.8
    #   c: s_p = c.d = 0, negatives c.a = -1, c.b = -.6
    #   d: s_p = 0, negatives d.a = 0, d.b = -.8
    terms = [
        math.log1p(math.exp(-1.6 / tau) + math.exp(-0.6 / tau)),
        math.log1p(math.exp(-1.2 / tau) + math.exp(-1.4 / tau)),
        math.log1p(math.exp(-1.0 / tau) + math.exp(-0.6 / tau)),
        math.log1p(math.exp(0.0) + math.exp(-0.8 / tau)),
    ]
    expected = tau / base * np.mean(terms)
    feats = np.array([[[1.0, 0.0], [0.6, 0.8]], [[-1.0, 0.0], [0.0, -1.0]]])
    labels = np.array([0, 1])
    kw = dict(temperature=tau, base_temperature=base)
    with jax.enable_x64(True):
        got = _loss(feats, labels, np.ones((2, 2), bool), **kw)
        np.testing.assert_allclose(float(got), expected, rtol=1e-12)
    got = _loss(feats.astype(np.float32), labels, np.ones((2, 2), bool), **kw)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    np.testing.assert_allclose(ref.contrastive(feats, labels, tau, base), expected, rtol=1e-12)
    # A padded third anchor of class 0 (junk embedding) and a padded third view change nothing.
    padded = np.concatenate([feats, [[[3.0, -2.0], [0.5, 0.5]]]])
    padded = np.concatenate([padded, np.full((3, 1, 2), 9.0)], axis=1)
    valid = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], bool)
    got = _loss(padded.astype(np.float32), np.array([0, 1, 0]), valid, **kw)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def _random_anchors(rng, labels, views, dim=6):
    return _unit(rng.normal(size=(len(labels), views, dim)))


@pytest.mark.parametrize(
    "labels, views",
    [
        ([0, 1, 2], 4),  # three classes, one anchor each
        ([0, 0, 1, 3, 3], 3),  # classes shared by anchors (two images)
        ([2, 2, 255, 7], 2),  # the ignore label as a class
        ([4, 4, 4], 2),  # one class: no negatives, loss 0
    ],
)
def test_matches_numpy_transcription(labels, views):
    rng = np.random.default_rng(len(labels) * 10 + views)
    labels = np.array(labels)
    feats = _random_anchors(rng, labels, views)
    want = ref.contrastive(feats, labels)
    with jax.enable_x64(True):
        got = float(_loss(feats, labels, np.ones((len(labels), views), bool)))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        # Padding: junk anchors (one of an existing class, one of a new class) and junk views.
        pad_feats = np.concatenate([feats, rng.normal(size=(2, views, 6)) * 4.0])
        pad_feats = np.concatenate([pad_feats, rng.normal(size=(len(labels) + 2, 2, 6))], axis=1)
        pad_labels = np.concatenate([labels, [labels[0], 99]])
        valid = np.zeros(pad_feats.shape[:2], bool)
        valid[: len(labels), :views] = True
        got = float(_loss(pad_feats, pad_labels, valid))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        if views == 3:  # once: a float 0/1 mask is the same mask; an [A] mask marks every view
            got = float(_loss(pad_feats, pad_labels, valid.astype(float)))
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
            anchors = np.arange(len(pad_labels)) < len(labels)
            whole = _loss(pad_feats[:, :views], pad_labels, anchors)
            np.testing.assert_allclose(float(whole), want, rtol=1e-10, atol=1e-12)
    if len(set(labels.tolist())) == 1:
        assert want == 0.0
    else:
        assert want > 0.1
    # float32 inputs compute in float32.
    got32 = _loss(feats.astype(np.float32), labels, np.ones((len(labels), views), bool))
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(float(got32), want, rtol=2e-5, atol=1e-6)


def test_sample_without_positive_is_nan_as_released():
    # Two classes with one view each (two images with disjoint classes at n_view = 1): 0 / 0.
    feats = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert math.isnan(ref.contrastive(feats, [0, 1]))
    assert math.isnan(float(_loss(feats, np.array([0, 1]), np.ones((2, 1), bool))))
    # No valid sample at all: 0, with a zero gradient.
    loss, grad = jax.jit(jax.value_and_grad(pipa.pixel_contrastive))(
        feats.astype(np.float32), np.array([0, 1]), np.zeros((2, 1), bool)
    )
    assert float(loss) == 0.0 and not np.asarray(grad).any()


def test_gradient_finite_differences():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 0, 2, 5])
    feats = _random_anchors(rng, labels, 3, dim=4) * rng.uniform(0.8, 1.2, size=(5, 3, 1))
    valid = np.ones((5, 3), bool)
    valid[4] = False  # a padded anchor
    valid[1, 2] = valid[3, 1] = False  # padded views
    with jax.enable_x64(True):
        f = jax.jit(
            jax.value_and_grad(lambda z: pipa.pixel_contrastive(z, labels, valid, 0.2, 0.07))
        )
        _, grad = f(feats)
        grad = np.asarray(grad)
        assert np.abs(grad).max() > 1e-3  # a non-trivial gradient...
        assert not grad[~valid].any()  # ...that never reaches a padded sample
        step = 1e-5
        for _ in range(3):
            v = rng.normal(size=feats.shape)
            numeric = (float(f(feats + step * v)[0]) - float(f(feats - step * v)[0])) / (2 * step)
            np.testing.assert_allclose(numeric, np.sum(grad * v), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# The sampler on a hand-made map: C = 5, max_views = 6 (a class needs > 6 pixels),
# max_samples = 20, two images of N = 40 pixels. (label, hard pixels, easy pixels):
_IMAGES = (
    # 0: both sides; 1: easy side short; 2: 6 pixels, not > 6; 3: no hard pixel; 255: all hard.
    ((0, 5, 5), (1, 8, 1), (2, 3, 3), (3, 0, 7), (255, 8, 0)),
    # 0: one hard pixel; 2: two hard; 4, 1, 3, 255: too few pixels.
    ((0, 1, 11), (2, 2, 6), (4, 1, 2), (255, 5, 0), (1, 6, 0), (3, 0, 6)),
)
_C, _MAX_VIEWS, _MAX_SAMPLES, _N = 5, 6, 20, 40
# The released rule by hand. As released (255 a class): T = 6 anchor classes, n_view =
# min(20 // 6, 6) = 3, n_view / 2 = 1.5: class 0 (5, 5) -> 1 hard + 2 easy; class 1 (8, 1):
# easy short -> all 1 easy + 2 hard; class 3 (0, 7) -> 3 easy; 255 (8, 0) -> 3 hard;
# image 1: class 0 (1, 11) -> 1 + 2; class 2 (2, 6) -> 1 + 2.
_RELEASED = {(0, 0): (1, 2), (0, 1): (2, 1), (0, 3): (0, 3), (0, 255): (3, 0)}
_RELEASED.update({(1, 0): (1, 2), (1, 2): (1, 2)})
# exclude_ignore: T = 5, n_view = 4, n_view / 2 = 2: class 0 (5, 5) -> 2 + 2; class 1 (8, 1) ->
# 3 + 1; class 3 -> 0 + 4; image 1: class 0 (1, 11): hard short -> 1 + 3; class 2 (2, 6) -> 2 + 2.
_EXCLUDED = {(0, 0): (2, 2), (0, 1): (3, 1), (0, 3): (0, 4), (1, 0): (1, 3), (1, 2): (2, 2)}


def _hand_map(seed=0):
    """labels, predict [2, N] from `_IMAGES`, pixels shuffled; feats [2, N, 2] = (image, pixel)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((2, _N), np.int64)
    predict = np.zeros((2, _N), np.int64)
    for b, spec in enumerate(_IMAGES):
        lab, pred = [], []
        for c, hard, easy in spec:
            lab += [c] * (hard + easy)
            wrong = rng.integers(0, _C, size=hard) if c == 255 else [(c + 1) % _C] * hard
            pred += list(wrong) + [c] * easy
        order = rng.permutation(_N)
        labels[b], predict[b] = np.array(lab)[order], np.array(pred)[order]
    feats = np.stack(np.meshgrid(np.arange(2), np.arange(_N), indexing="ij"), -1).astype(float)
    return feats, labels, predict


@functools.cache
def _select(exclude_ignore, max_samples=_MAX_SAMPLES):
    return jax.jit(
        functools.partial(
            pipa.select_anchors,
            num_classes=_C,
            max_samples=max_samples,
            max_views=_MAX_VIEWS,
            exclude_ignore=exclude_ignore,
        )
    )


def _picked(anchor_feats, valid, a):
    """(image, pixel indices) of anchor a's valid views."""
    views = np.asarray(anchor_feats)[a][np.asarray(valid)[a]]
    assert len(set(views[:, 0])) <= 1
    return (int(views[0, 0]) if len(views) else None), views[:, 1].astype(int)


def _induced_randperm(ranks):
    # The released draw equivalent to the ranks: the candidates in increasing rank.
    return lambda ii, cls_id, which, n, indices: np.argsort(ranks[ii][indices], kind="stable")


@pytest.mark.parametrize("exclude_ignore", [False, True])
def test_sampling_follows_the_released_rule(exclude_ignore):
    feats, labels, predict = _hand_map()
    ranks = np.asarray(pipa.draw_pixel_ranks(jax.random.key(0), 2, _N))
    out_feats, out_labels, valid = _select(exclude_ignore)(feats, labels, predict, ranks)
    out_feats, out_labels, valid = map(np.asarray, (out_feats, out_labels, valid))
    k = _C if exclude_ignore else _C + 1
    assert out_feats.shape == (2 * k, _MAX_VIEWS, 2) and valid.shape == (2 * k, _MAX_VIEWS)
    np.testing.assert_array_equal(
        out_labels, np.tile(pipa.anchor_class_ids(_C, 255, exclude_ignore), 2)
    )
    expected = _EXCLUDED if exclude_ignore else _RELEASED
    n_view = 4 if exclude_ignore else 3
    got = {}
    for a in range(2 * k):
        image, pixels = _picked(out_feats, valid, a)
        if image is None:
            assert not out_feats[a].any()  # empty slots hold zeros
            continue
        assert image == a // k
        cls = int(out_labels[a])
        np.testing.assert_array_equal(labels[image, pixels], cls)  # the anchor's class only
        assert len(set(pixels)) == len(pixels) == n_view  # distinct pixels, n_view of them
        hard = predict[image, pixels] != cls
        num_hard = int(hard.sum())
        assert not hard[num_hard:].any()  # the hard views first, then the easy ones
        got[(image, cls)] = (num_hard, n_view - num_hard)
    assert got == expected
    assert (255 in out_labels[valid.any(1)]) != exclude_ignore

    # The transcription of `_hard_anchor_sampling`, given the draws the ranks induce, picks the
    # same pixels in the same order (valid anchors in slot order = the released anchor order).
    ignore_label = 255 if exclude_ignore else -1
    want_feats, want_labels, picks = ref.hard_anchor_sampling(
        feats, labels, predict, _induced_randperm(ranks), ignore_label, _MAX_SAMPLES, _MAX_VIEWS
    )
    keep = valid.any(1)
    np.testing.assert_array_equal(out_labels[keep], want_labels)
    np.testing.assert_array_equal(out_feats[keep][:, :n_view], want_feats)
    assert [(len(h), len(e)) for h, e in picks] == list(expected.values())


def test_sampler_key_version_and_contrast_match_the_transcription():
    _, labels, predict = _hand_map(1)
    rng = np.random.default_rng(5)
    feats = _unit(rng.normal(size=(2, _N, 4)))
    key = jax.random.key(7)
    sample = jax.jit(
        functools.partial(
            pipa.hard_anchor_sampling, num_classes=_C, max_samples=_MAX_SAMPLES, max_views=6
        )
    )
    with jax.enable_x64(True):
        got = sample(key, feats, labels, predict)
        ranks = pipa.draw_pixel_ranks(key, 2, _N)
        for x, y in zip(got, _select(False)(feats, labels, predict, ranks)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        want_feats, want_labels, _ = ref.hard_anchor_sampling(
            feats, labels, predict, _induced_randperm(np.asarray(ranks)), -1, _MAX_SAMPLES, 6
        )
        # The whole released forward (sampling, then the contrast) on the same draws, and its
        # gradient, which reaches exactly the picked pixels.
        loss, grad = jax.jit(
            jax.value_and_grad(lambda z: pipa.pixel_contrastive(*sample(key, z, labels, predict)))
        )(feats)
        np.testing.assert_allclose(
            float(loss), ref.contrastive(want_feats, want_labels), rtol=1e-10
        )
        assert float(loss) > 0.1
        touched = np.abs(np.asarray(grad)).sum(-1) > 0
        assert touched.sum() == want_feats.shape[0] * want_feats.shape[1] == 18
        # Another key, other picks.
        other = sample(jax.random.key(8), feats, labels, predict)
        assert not np.array_equal(np.asarray(other[0]), np.asarray(got[0]))


def test_pick_frequencies_are_uniform():
    # Image 0, class 1 keeps 2 of its 8 hard pixels (p = 1/4 each); class 0 keeps 2 of its 5 easy
    # pixels (p = 2/5 each), over 400 keys.
    feats, labels, predict = _hand_map()
    sample = jax.jit(
        jax.vmap(
            functools.partial(
                pipa.hard_anchor_sampling,
                num_classes=_C,
                max_samples=_MAX_SAMPLES,
                max_views=_MAX_VIEWS,
            ),
            in_axes=(0, None, None, None),
        )
    )
    anchor_feats, _, valid = sample(
        jax.random.split(jax.random.key(1), 400), feats, labels, predict
    )
    assert np.asarray(valid).all(0).sum() == 6 * 3
    pixels = np.asarray(anchor_feats)[..., 1].astype(int)  # [400, A, V]
    for cls, views, pool, want in (
        (1, slice(0, 2), predict[0] != 1, 0.25),
        (0, slice(1, 3), predict[0] == 0, 0.4),
    ):
        candidates = np.nonzero((labels[0] == cls) & pool)[0]
        counts = np.array([(pixels[:, cls, views] == p).sum() for p in candidates])
        assert counts.sum() == 400 * (views.stop - views.start)
        np.testing.assert_allclose(counts / 400, want, atol=0.1)


def test_no_anchor_class_and_too_many_classes():
    feats, labels, predict = _hand_map()
    # Every class at most 6 pixels: no anchor (the release returns None); the loss is 0.
    i = np.arange(_N)
    # 6 pixels for each class and for 255, and 4 of label 7 (no class of the 5).
    sparse = np.where(i < 30, i % 5, np.where(i < 36, 255, 7))[None].repeat(2, 0)
    ranks = np.argsort(np.random.default_rng(0).random((2, _N)), axis=1)
    out = _select(False)(feats, sparse, predict, ranks)
    assert not np.asarray(out[2]).any() and not np.asarray(out[0]).any()
    assert float(_loss(*out)) == 0.0
    assert ref.hard_anchor_sampling(feats, sparse, predict, None, -1, 20, 6)[0] is None
    # More anchor classes than max_samples: n_view = 0, no valid sample, loss 0 (the release
    # takes the mean of an empty tensor).
    out = _select(False, max_samples=5)(feats, labels, predict, ranks)
    assert not np.asarray(out[2]).any() and float(_loss(*out)) == 0.0


def test_select_anchors_rejects_bad_arguments():
    feats, labels, predict = _hand_map()
    ranks = np.tile(np.arange(_N), (2, 1))
    with pytest.raises(ValueError, match="outside"):
        pipa.select_anchors(feats, labels, predict, ranks, num_classes=5, ignore_index=3)
    with pytest.raises(ValueError, match="ranks"):
        pipa.select_anchors(feats, labels, predict, ranks[:, :5], num_classes=5)
    with pytest.raises(ValueError, match=r"\[A, V\]"):
        pipa.pixel_contrastive(np.zeros((2, 3, 4)), np.zeros(2), np.ones((3,), bool))
