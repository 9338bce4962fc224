"""SePiCo's class-balanced crop against a numpy transcription of the released `RandomCrop`
box score and selection loop, on hand-made and random labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.uda.class_balanced_crop import (
    apply_crop,
    best_offsets,
    box_scores,
    choose_crop,
    crop_score,
    draw_offsets,
)

IGNORE = 255


def np_score(label, cat_max_ratio=0.75, ignore=IGNORE):
    """The released box score: unique counts without the ignore label, then the sum of log
    counts (> 1) when more than one class is present and the largest share is below the ratio."""
    values, cnt = np.unique(label, return_counts=True)
    cnt = cnt[values != ignore]
    if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
        return float(np.log(cnt[cnt > 1].astype(np.float32)).sum(dtype=np.float32))
    return 0.0


def np_choose(label, boxes, crop, cat_max_ratio=0.75):
    """The released selection loop over given boxes: keep a box only on a strictly better score."""
    best_score, best = -1.0, None
    for y, x in boxes:
        score = np_score(label[y : y + crop[0], x : x + crop[1]], cat_max_ratio)
        if score > best_score:
            best_score, best = score, (y, x)
    return best


def _grid(rows):
    # A 4x4 label map from a list of (label, count) in raster order.
    flat = np.concatenate([np.full(n, v) for v, n in rows])
    assert flat.size == 16
    return flat.reshape(4, 4).astype(np.int32)


@pytest.mark.parametrize(
    "rows",
    [
        [(3, 16)],  # one class
        [(0, 13), (1, 3)],  # a class over 75 %
        [(0, 12), (1, 4)],  # exactly 75 %: not below the ratio
        [(0, 6), (1, 5), (2, 4), (7, 1)],  # several classes (the count-1 class adds log 1)
        [(IGNORE, 8), (0, 7), (1, 1)],  # 7/8 of the non-ignored pixels: 0
        [(IGNORE, 8), (0, 5), (1, 3)],  # the share counts no ignored pixel
        [(IGNORE, 8), (4, 8)],  # the ignore label is no class
        [(IGNORE, 16)],
    ],
)
def test_crop_score_matches_formula(rows):
    label = _grid(rows)
    got = float(crop_score(jnp.asarray(label)))
    assert got == pytest.approx(np_score(label), rel=1e-6)
    counts = [n for v, n in rows if v != IGNORE]
    balanced = len(counts) > 1 and max(counts) / sum(counts) < 0.75
    expected = sum(np.log(n) for n in counts if n > 1) if balanced else 0.0
    assert got == pytest.approx(expected, rel=1e-6)


def test_crop_score_ratio_argument():
    label = _grid([(0, 13), (1, 3)])
    assert float(crop_score(jnp.asarray(label), cat_max_ratio=0.9)) == pytest.approx(
        np.log(13) + np.log(3), rel=1e-6
    )


def _periodic_label():
    """8 x 24: four classes by column (period 4) left of x = 12, class 5 from x = 12 on."""
    label = np.tile(np.array([0, 1, 2, 3]), (8, 3))
    return np.concatenate([label, np.full((8, 12), 5)], axis=1).astype(np.int32)


def test_best_offsets_picks_first_best_box():
    crop = (4, 4)
    first = _periodic_label()
    flat = np.full_like(first, 5)
    labels = np.stack([first, flat])
    # Image 0: x = 16 scores 0, x = 10 less than the periodic part, x = 4 / 0 / 8 tie (the first,
    # x = 4, wins). Image 1: every box scores 0, so the first box is kept.
    boxes = np.array(
        [[[0, 16], [2, 10], [1, 4], [0, 0], [3, 8]], [[2, 3], [0, 0], [4, 20], [1, 1], [0, 7]]],
        np.int32,
    )
    scores = np.asarray(box_scores(jnp.asarray(boxes), jnp.asarray(labels), crop))
    assert scores[0, 0] == 0.0 and 0.0 < scores[0, 1] < scores[0, 2]
    np.testing.assert_array_equal(scores[0, 2:], scores[0, 2])
    np.testing.assert_array_equal(scores[1], 0.0)
    got = np.asarray(best_offsets(jnp.asarray(boxes), jnp.asarray(labels), crop))
    np.testing.assert_array_equal(got, [[1, 4], [2, 3]])
    for b in range(2):
        assert tuple(got[b]) == np_choose(labels[b], boxes[b], crop)


def test_box_scores_and_choice_match_numpy_on_random_labels():
    rng = np.random.default_rng(0)
    batch, height, width, crop, k = 3, 20, 28, (9, 12), 12
    # Blocky labels (few classes per box, so the ratio test passes and fails), some ignored.
    coarse = rng.choice(
        [0, 1, 2, 5, 18, IGNORE], size=(batch, 5, 7), p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1]
    )
    labels = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.int32)
    boxes = np.stack(
        [
            rng.integers(0, height - crop[0] + 1, (batch, k)),
            rng.integers(0, width - crop[1] + 1, (batch, k)),
        ],
        axis=-1,
    ).astype(np.int32)
    scores = np.asarray(box_scores(jnp.asarray(boxes), jnp.asarray(labels), crop))
    expected = np.array(
        [
            [np_score(labels[b, y : y + crop[0], x : x + crop[1]]) for y, x in boxes[b]]
            for b in range(batch)
        ]
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert np.any(expected == 0.0) and np.any(expected > 0.0)
    got = np.asarray(best_offsets(jnp.asarray(boxes), jnp.asarray(labels), crop))
    for b in range(batch):
        np.testing.assert_array_equal(got[b], boxes[b, np.argmax(scores[b])])
        ref = np_choose(labels[b], boxes[b], crop)
        assert np_score(
            labels[b, got[b, 0] : got[b, 0] + crop[0], got[b, 1] : got[b, 1] + crop[1]]
        ) == (
            pytest.approx(
                np_score(labels[b, ref[0] : ref[0] + crop[0], ref[1] : ref[1] + crop[1]]), rel=1e-6
            )
        )


def test_apply_crop_equals_slicing():
    rng = np.random.default_rng(1)
    crop = (4, 5)
    images = rng.normal(size=(3, 10, 12, 3)).astype(np.float32)
    labels = rng.integers(0, 19, size=(3, 10, 12)).astype(np.int32)
    offsets = np.array([[0, 0], [6, 7], [3, 2]], np.int32)  # corners and an inner box
    crop_jit = jax.jit(apply_crop, static_argnums=2)
    for x in (images, labels):
        got = np.asarray(crop_jit(jnp.asarray(x), jnp.asarray(offsets), crop))
        assert got.shape == (3, *crop, *x.shape[3:]) and got.dtype == x.dtype
        for b, (y, x0) in enumerate(offsets):
            np.testing.assert_array_equal(got[b], x[b, y : y + crop[0], x0 : x0 + crop[1]])


def test_choose_crop_deterministic_in_range_and_composed():
    rng = np.random.default_rng(2)
    labels = jnp.asarray(rng.integers(0, 4, size=(2, 12, 20)), jnp.int32)
    crop = (10, 16)
    choose = jax.jit(choose_crop, static_argnums=(2, 3))
    key = jax.random.key(7)
    a, b = choose(key, labels, crop, 10), choose(key, labels, crop, 10)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 2) and a.dtype == jnp.int32
    candidates = draw_offsets(key, 2, (12, 20), crop, 10)
    np.testing.assert_array_equal(a, best_offsets(candidates, labels, crop))
    # Offsets are uniform over 0..H-h and 0..W-w, both ends included (randint(0, margin + 1)).
    many = np.asarray(draw_offsets(jax.random.key(0), 4, (12, 20), crop, 100))
    assert set(many[..., 0].ravel()) == {0, 1, 2}
    assert set(many[..., 1].ravel()) == {0, 1, 2, 3, 4}
    cropped = apply_crop(labels, a, crop)
    assert cropped.shape == (2, *crop)


def test_crop_larger_than_image_is_rejected():
    labels = jnp.zeros((1, 8, 8), jnp.int32)
    with pytest.raises(ValueError, match="crop_size"):
        choose_crop(jax.random.key(0), labels, (9, 4))
    with pytest.raises(ValueError, match="crop_size"):
        apply_crop(labels, jnp.zeros((1, 2), jnp.int32), (4, 9))
