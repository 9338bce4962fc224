"""CPSL's consistency KL, bank contrast, prototype initialisation, prototype EMA and running
prior: golden values worked out by hand, the released pieces against the numpy transcription
(`tests/numpy_cpsl.py`: the `proto_consistW` block, `CustomModel.contrastive`, the EMA line,
`calc_prototype.py`), float64 finite-difference gradients with the released detaches, and the
reconstructed prior on a hand-made sequence."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.losses import cpsl
from tests import numpy_cpsl as ref
from tests.losses_cpsl_test import _directional_check


@functools.cache
def _jitted(name, **static):
    return jax.jit(functools.partial(getattr(cpsl, name), **static))


# ------------------------------------------------------------------------------------------------
# Consistency KL


def test_consistency_golden():
    # Valid pixel: teacher scores (0, 0) -> p = (1/2, 1/2); student (0, T ln 3) -> q = (1/4, 3/4).
    # KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); the released mean runs over pixels AND the K = 2
    # classes: ln(4/3) / 4. The second pixel is invalid: NaN teacher and large student change
    # nothing.
    t = 0.08
    teacher = np.array([[0.0, 0.0], [np.nan, np.nan]])
    student = np.array([[0.0, t * math.log(3.0)], [40.0, -40.0]])
    want = math.log(4.0 / 3.0) / 4.0
    for valid in (np.array([True, False]), np.array([[True, True], [False, False]])):
        got = float(_jitted("consistency_kl")(teacher, student, valid))
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # Identical views cost nothing; no valid pixel gives 0 (released: NaN).
    same = np.array([[0.3, -0.2, 0.9]])
    assert abs(float(_jitted("consistency_kl")(same, same, np.array([True])))) < 1e-7
    assert float(_jitted("consistency_kl")(teacher, student, np.array([False, False]))) == 0.0


def _consistency_case(seed, dtype=np.float64):
    # [N, H, W, K] cosine scores; image 0 has a cutout box and image 1 a strip, both padded with
    # the released 250 in every class.
    rng = np.random.default_rng(seed)
    teacher = rng.uniform(-1.0, 1.0, (2, 5, 6, 4))
    student = rng.uniform(-1.0, 1.0, (2, 5, 6, 4))
    teacher[0, 1:3, 2:5] = 250.0
    teacher[1, :, :2] = 250.0
    return teacher.astype(dtype), student.astype(dtype)


@pytest.mark.parametrize("temperature", [0.08, 0.5])
def test_consistency_matches_numpy_transcription(temperature):
    teacher, student = _consistency_case(0)
    want = ref.consistency(
        teacher.transpose(0, 3, 1, 2), student.transpose(0, 3, 1, 2), temperature
    )
    f = _jitted("consistency_kl", temperature=temperature)
    with jax.enable_x64(True):
        per_element = float(f(teacher, student, teacher != 250.0))
        per_pixel = float(f(teacher, student, teacher[..., 0] != 250.0))
    np.testing.assert_allclose([per_element, per_pixel], want, rtol=1e-12)
    # A per-pixel mean of the summed KL would be K = 4 times larger.
    assert want > 0.0
    # float32, the released dtype.
    t32, s32 = _consistency_case(0, np.float32)
    got = float(f(t32, s32, t32[..., 0] != 250.0))
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_consistency_gradient_reaches_the_student_only():
    teacher, student = _consistency_case(1)
    valid = teacher[..., 0] != 250.0
    count = valid.sum() * teacher.shape[-1]
    with jax.enable_x64(True):
        f_student = jax.jit(
            jax.value_and_grad(lambda s: cpsl.consistency_kl(teacher, s, valid, temperature=0.5))
        )
        _directional_check(f_student, student, 2)
        # Closed form of d/ds_c: (q_c - p_c) / (T * #elements) on valid pixels, 0 elsewhere.
        p = ref._softmax(np.where(valid[..., None], teacher, 0.0) / 0.5, -1)
        q = ref._softmax(student / 0.5, -1)
        want = np.where(valid[..., None], (q - p) / (0.5 * count), 0.0)
        np.testing.assert_allclose(np.asarray(f_student(student)[1]), want, rtol=1e-10, atol=1e-15)
        # The teacher side carries no gradient (EMA features, W_ema in no optimizer).
        grad_t = jax.jit(jax.grad(lambda t: cpsl.consistency_kl(t, student, valid)))(teacher)
        assert not np.asarray(grad_t).any()


# ------------------------------------------------------------------------------------------------
# Class means and the initial prototypes

# Two images of 3 pixels, D = 2, K = 3. Image 0: classes 0, 0, 1; image 1: 0, 1 (invalid), 1.
# Class 2 never occurs.
_FEATS = np.array([[[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]], [[5.0, 6.0], [9.0, 9.0], [2.0, 0.0]]])
_LABELS = np.array([[0, 0, 1], [0, 1, 1]])
_VALID = np.array([[True, True, True], [True, False, True]])


def test_class_means_hand_made_with_an_absent_class():
    f = _jitted("class_means", num_classes=3)
    means, counts = f(_FEATS, _LABELS, valid=_VALID)
    # Pooled: class 0 = mean of (1,0), (3,2), (5,6) = (3, 8/3); class 1 = mean of (0,4), (2,0).
    np.testing.assert_allclose(np.asarray(means), [[3.0, 8 / 3], [1.0, 2.0], [0.0, 0.0]], 1e-6)
    np.testing.assert_array_equal(np.asarray(counts), [3, 2, 0])
    # Per image: class 0 = mean of (2, 1) and (5, 6) = (3.5, 3.5); class 1 = mean of (0, 4) and
    # (2, 0) = (1, 2); counts are images.
    f_img = _jitted("class_means", num_classes=3, per_image=True)
    means, counts = f_img(_FEATS, _LABELS, valid=_VALID)
    np.testing.assert_allclose(np.asarray(means), [[3.5, 3.5], [1.0, 2.0], [0.0, 0.0]], 1e-6)
    np.testing.assert_array_equal(np.asarray(counts), [2, 2, 0])
    # min_count 2 per image: only image 0's class 0 qualifies; class 1 becomes absent.
    means, counts = _jitted("class_means", num_classes=3, per_image=True, min_count=2)(
        _FEATS, _LABELS, valid=_VALID
    )
    np.testing.assert_allclose(np.asarray(means), [[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]], 1e-6)
    np.testing.assert_array_equal(np.asarray(counts), [1, 0, 0])
    # Without the mask the invalid (9, 9) joins class 1; labels outside [0, K) are not counted.
    labels = _LABELS.copy()
    labels[0, 0] = 255
    means, counts = f(_FEATS, labels)
    np.testing.assert_allclose(np.asarray(means)[:2], [[4.0, 4.0], [11 / 3, 13 / 3]], 1e-6)
    np.testing.assert_array_equal(np.asarray(counts), [2, 3, 0])
    # The initial W: unit rows, and the released zero row for the absent class.
    w = np.asarray(
        _jitted("initial_prototypes", num_classes=3, min_count=1)(_FEATS, _LABELS, valid=_VALID)
    )
    np.testing.assert_allclose(w[0], [1.0, 1.0] / np.sqrt(2.0), rtol=1e-6)
    np.testing.assert_allclose(w[1], [1.0, 2.0] / np.sqrt(5.0), rtol=1e-6)
    assert not w[2].any()


def test_class_means_per_image_matches_calc_prototype():
    # 3 images of 6 x 5 pixels, K = 5: class 4 never occurs, class 3 has fewer than 10 pixels in
    # every image, classes 1 and 2 pass the 10-pixel rule in some images only.
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(3, 6, 5, 7))
    labels = rng.choice(4, size=(3, 6, 5), p=[0.5, 0.22, 0.2, 0.08])
    with jax.enable_x64(True):
        means, counts = _jitted("class_means", num_classes=5, per_image=True, min_count=10)(
            feats, labels
        )
        w = np.asarray(_jitted("initial_prototypes", num_classes=5)(feats, labels))
    vectors, nums = ref.calc_prototype(feats.transpose(0, 3, 1, 2), labels, 5)
    np.testing.assert_allclose(np.asarray(means), vectors, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(counts), nums)
    pixel_counts = np.array([[(lab == c).sum() for c in range(5)] for lab in labels])
    assert nums[0] == 3 and nums[3] == nums[4] == 0 and 0 < nums[1] + nums[2] < 6, pixel_counts
    # train.py: W = F.normalize(centroids), zero rows stay zero.
    np.testing.assert_allclose(w, ref._normalize(vectors, 1), rtol=1e-12)
    assert not w[3:].any()


# ------------------------------------------------------------------------------------------------
# EMA and the running prior


def test_ema_update_as_released():
    assert float(_jitted("ema_update")(jnp.float32(1.0), jnp.float32(0.0))) == pytest.approx(0.999)
    rng = np.random.default_rng(4)
    old = ref._normalize(rng.normal(size=(4, 6)), 1)
    new = ref._normalize(rng.normal(size=(4, 6)), 1)
    with jax.enable_x64(True):
        got = np.asarray(_jitted("ema_update")(old, new))
        tree = _jitted("ema_update", momentum=0.5)({"w": old, "b": (new,)}, {"w": new, "b": (old,)})
    np.testing.assert_allclose(got, ref.prototypes_ema(old, new), rtol=1e-15)
    # No normalisation after the update: the rows of a mix of unit rows are shorter than 1.
    assert (np.linalg.norm(got, axis=1) < 1.0 - 1e-9).all()
    np.testing.assert_allclose(np.asarray(tree["w"]), (old + new) / 2, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(tree["b"][0]), (old + new) / 2, rtol=1e-15)


def test_prior_ema_hand_made_sequence():
    f = _jitted("prior_ema", num_classes=3, momentum=0.5)
    prior = np.array([0.5, 0.5, 0.0])
    steps = [
        # labels, valid, the new prior by hand (r <- r / 2 + shares / 2)
        ([0, 0, 2, 2, 1], [True, True, True, True, False], [0.5, 0.25, 0.25]),  # shares .5 0 .5
        ([1, 1, 1, 255, 0], [True, True, True, True, False], [0.25, 0.625, 0.125]),  # 0 1 0
        ([0, 1, 2, 0, 1], [False] * 5, [0.25, 0.625, 0.125]),  # nothing valid: unchanged
        ([2, 2, 2, 2, 2], None, [0.125, 0.3125, 0.5625]),  # 0 0 1
    ]
    for labels, valid, want in steps:
        valid = None if valid is None else np.array(valid)
        prior = np.asarray(f(prior, np.array(labels), valid))
        np.testing.assert_allclose(prior, want, rtol=1e-6)
        np.testing.assert_allclose(prior.sum(), 1.0, rtol=1e-6)
    # A 2-D label map counts every pixel the same way.
    got = f(np.full(3, 1 / 3), np.array([[0, 1], [1, 1]]), np.ones((2, 2), bool))
    np.testing.assert_allclose(np.asarray(got), [(1 / 3 + 0.25) / 2, (1 / 3 + 0.75) / 2, 1 / 6])


# ------------------------------------------------------------------------------------------------
# Bank contrast

_BANK = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
_BANK_LABELS = np.array([0, 1, 1])


def test_bank_contrast_golden():
    # T = 1. Anchor (1, 0), label 0: s = (1, 0, -1), one positive (row 0), negatives rows 1, 2:
    #   l = -(1 - log(e + 1 + 1/e)) / (1 + 1e-5).
    # Anchor (0, 1), label 1: s = (0, 1, 0), positives rows 1 and 2, negative row 0:
    #   l = -[(1 - log(e + 1)) + (0 - log(1 + 1))] / (2 + 1e-5).
    # Anchor (0, 1), label 2: no positive, l = 0, still counted in the mean.
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = np.array([0, 1, 2])
    e = math.e
    l0 = -(1.0 - math.log(e + 1.0 + 1.0 / e)) / (1.0 + 1e-5)
    l1 = -((1.0 - math.log(e + 1.0)) - math.log(2.0)) / (2.0 + 1e-5)
    f = _jitted("bank_contrast", temperature=1.0)
    got = float(f(feats, labels, _BANK, _BANK_LABELS))
    np.testing.assert_allclose(got, (l0 + l1) / 3, rtol=1e-6)
    # Anchor masks: the mean over the valid anchors; bank masks: row 2 dropped from anchor 1's
    # positives (l = -(1 - log(e + 1)) / (1 + 1e-5)) and from anchor 0's negatives.
    got = float(f(feats, labels, _BANK, _BANK_LABELS, valid=np.array([True, True, False])))
    np.testing.assert_allclose(got, (l0 + l1) / 2, rtol=1e-6)
    bank_valid = np.array([True, True, False])
    got = float(f(feats[:2], labels[:2], _BANK, _BANK_LABELS, bank_valid=bank_valid))
    l0_sub = -(1.0 - math.log(e + 1.0)) / (1.0 + 1e-5)
    l1_sub = -(1.0 - math.log(e + 1.0)) / (1.0 + 1e-5)
    np.testing.assert_allclose(got, (l0_sub + l1_sub) / 2, rtol=1e-6)
    assert float(f(feats, labels, _BANK, _BANK_LABELS, valid=np.zeros(3, bool))) == 0.0


def _contrast_case(seed, anchors=12, length=20, dim=6, classes=4):
    rng = np.random.default_rng(seed)
    feats = ref._normalize(rng.normal(size=(anchors, dim)), 1)
    bank = ref._normalize(rng.normal(size=(length, dim)), 1)
    labels = rng.integers(0, classes + 1, anchors)  # class `classes` is never in the bank
    labels[0] = classes
    bank_labels = rng.integers(0, classes, length)
    return feats, labels, bank, bank_labels


def test_bank_contrast_matches_numpy_transcription():
    feats, labels, bank, bank_labels = _contrast_case(5)
    f = _jitted("bank_contrast")
    with jax.enable_x64(True):
        got = float(f(feats, labels, bank, bank_labels))
        # Masks equal the transcription on the kept subsets.
        valid = np.arange(12) % 3 != 0
        bank_valid = np.arange(20) % 4 != 1
        got_sub = float(f(feats, labels, bank, bank_labels, valid=valid, bank_valid=bank_valid))
    want = ref.contrastive(bank, bank_labels[:, None].astype(float), feats, labels[:, None], 0.08)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    want_sub = ref.contrastive(
        bank[bank_valid],
        bank_labels[bank_valid][:, None].astype(float),
        feats[valid],
        labels[valid][:, None],
        0.08,
    )
    np.testing.assert_allclose(got_sub, want_sub, rtol=1e-12)
    assert abs(got - got_sub) > 1e-3
    # float32 (the released dtype); the released T = 0.08 spreads logits over 25 units.
    got32 = float(f(feats.astype(np.float32), labels, bank.astype(np.float32), bank_labels))
    np.testing.assert_allclose(got32, want, rtol=1e-5)


def test_bank_contrast_gradient_reaches_the_anchors_only():
    feats, labels, bank, bank_labels = _contrast_case(6)
    bank_valid = np.arange(20) % 4 != 1
    with jax.enable_x64(True):
        for bv in (None, bank_valid):
            f = jax.jit(
                jax.value_and_grad(
                    lambda x, bv=bv: cpsl.bank_contrast(
                        x, labels, bank, bank_labels, temperature=0.5, bank_valid=bv
                    )
                )
            )
            _directional_check(f, feats, 7)
            assert np.isfinite(np.asarray(f(feats)[1])).all()
        grad_bank = jax.jit(jax.grad(lambda b: cpsl.bank_contrast(feats, labels, b, bank_labels)))(
            bank
        )
        assert not np.asarray(grad_bank).any()
