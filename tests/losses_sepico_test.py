"""SePiCo's losses: golden values worked out by hand, gradients against finite differences, every
criterion against a numpy transcription of the released functions (`tests/numpy_sepico.py`, which
removes the ignored pixels as the reference does), the label downscaling against a per-block loop
of its rule, and the empty case."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.losses import sepico
from tests import numpy_sepico as ref

# ------------------------------------------------------------------------------------------------
# Golden values: 2-D embeddings, 2 or 3 classes

# Pixels: z, label, valid. The last one is invalid: its (large) embedding must change nothing.
_FEATS = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [5.0, 5.0]])
_LABELS = np.array([0, 0, 1, 1])
_VALID = np.array([True, True, True, False])
_MEAN = np.array([[1.0, 0.0], [0.0, 2.0]])  # mu_0, mu_1
_VARIANCE = np.array([[1.0, 0.0], [0.0, 0.5]])  # s2_0, s2_1


def _softplus(x):
    return math.log1p(math.exp(x))


@functools.cache
def _jitted(name, **static):
    return jax.jit(functools.partial(getattr(sepico, name), **static))


@pytest.mark.parametrize("tau", [0.5, 100.0])
def test_proto_golden(tau):
    # z . mu_c: pixel 0 (1, 0) -> (1, 0); pixel 1 (0, 1) -> (0, 2); pixel 2 (.6, .8) -> (.6, 1.6).
    # -log softmax(s / tau)[y] with two classes = softplus((s_other - s_y) / tau):
    #   pixel 0 (y=0): softplus(-1 / tau); pixel 1 (y=0): softplus(2 / tau);
    #   pixel 2 (y=1): softplus((0.6 - 1.6) / tau) = softplus(-1 / tau).
    expected = (2 * _softplus(-1 / tau) + _softplus(2 / tau)) / 3
    got = _jitted("proto_contrastive", temperature=tau)(_FEATS, _LABELS, _VALID, _MEAN)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # At tau = 100 the loss is log 2 plus little: the temperature divides.
    if tau == 100.0:
        assert abs(float(got) - math.log(2)) < 0.01


@pytest.mark.parametrize("tau, ratio", [(0.5, 1.0), (0.5, 0.5), (100.0, 1.0)])
def test_dist_golden(tau, ratio):
    # l_i = -z.mu_y / tau + log sum_c exp(z.mu_c / tau + k * sum_a z_a^2 s2_ca), k = ratio/(2 tau^2).
    #   pixel 0, z^2 = (1, 0):     class 0: 1/tau + k * 1,     class 1: 0 + k * 0;   y = 0
    #   pixel 1, z^2 = (0, 1):     class 0: 0 + 0,             class 1: 2/tau + k * 0.5;   y = 0
    #   pixel 2, z^2 = (.36, .64): class 0: .6/tau + k * .36,  class 1: 1.6/tau + k * .32;  y = 1
    k = ratio / (2 * tau * tau)

    def lse(a, b):
        return max(a, b) + math.log1p(math.exp(-abs(a - b)))

    terms = [
        -1 / tau + lse(1 / tau + k, 0.0),
        -0.0 + lse(0.0, 2 / tau + 0.5 * k),
        -1.6 / tau + lse(0.6 / tau + 0.36 * k, 1.6 / tau + 0.32 * k),
    ]
    f = _jitted("dist_contrastive", temperature=tau, ratio=ratio)
    got = f(_FEATS, _LABELS, _VALID, _MEAN, _VARIANCE)
    np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-6)
    # With zero variance DistCL is ProtoCL.
    np.testing.assert_allclose(
        float(f(_FEATS, _LABELS, _VALID, _MEAN, np.zeros_like(_VARIANCE))),
        float(_jitted("proto_contrastive", temperature=tau)(_FEATS, _LABELS, _VALID, _MEAN)),
        rtol=1e-6,
    )


# Three class banks, 3 slots each; slots not marked valid hold junk that must be ignored.
_BANK = np.array(
    [
        [[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]],  # class 0: (1, 0), (0, 1)
        [[0.0, 0.0], [7.0, -7.0], [7.0, 7.0]],  # class 1: the initial zero vector only
        [[-1.0, 0.0], [-1.0, -2.0], [9.0, 9.0]],  # class 2: (-1, 0), (-1, -2)
    ]
)
_BANK_VALID = np.array([[True, True, False], [True, False, False], [True, True, False]])


@pytest.mark.parametrize("tau", [0.5, 100.0])
def test_bank_golden(tau):
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [3.0, 3.0]])
    labels = np.array([0, 2, 1, 0])
    valid = np.array([True, True, True, False])
    # l = mean_j log(1 + S * exp(-s_j)), s_j the positives, S = sum over other classes of
    # exp(mean similarity to their bank).
    # Anchor (1, 0), class 0: positives (1, 0) / tau; class 1 mean sim 0; class 2 sims (-1, -1).
    s_neg = 1 + math.exp(-1 / tau)
    l0 = (math.log1p(s_neg * math.exp(-1 / tau)) + math.log1p(s_neg)) / 2
    # Anchor (0, 1), class 2: positives (0, -2) / tau; class 0 sims (0, 1) -> mean 0.5; class 1 0.
    s_neg = math.exp(0.5 / tau) + 1
    l1 = (math.log1p(s_neg) + math.log1p(s_neg * math.exp(2 / tau))) / 2
    # Anchor (.6, .8), class 1: one positive, 0; class 0 sims (.6, .8) -> mean .7;
    # class 2 sims (-.6, -2.2) -> mean -1.4.
    l2 = math.log1p(math.exp(0.7 / tau) + math.exp(-1.4 / tau))
    f = _jitted("bank_contrastive", temperature=tau)
    got = f(feats, labels, valid, _BANK, _BANK_VALID)
    np.testing.assert_allclose(float(got), (l0 + l1 + l2) / 3, rtol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 100.0])
def test_regularizer_golden(tau):
    # z_bar = mean of the valid pixels (1, 0), (0, 1), (.6, .8) = (1.6/3, 1.8/3);
    # z_bar . mu = (1.6/3, 3.6/3) = (a, b); with 2 classes
    # sum_c log softmax_c = -softplus(b - a) - softplus(a - b), divided by C log C = 2 log 2.
    a, b = 1.6 / 3 / tau, 3.6 / 3 / tau
    expected = -(_softplus(b - a) + _softplus(a - b)) / (2 * math.log(2))
    got = _jitted("proto_regularizer", temperature=tau)(_FEATS, _VALID, _MEAN)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    assert float(got) <= -1.0  # -1 only at the uniform softmax
    # sepico_loss = the variant + reg_weight * the regulariser.
    both = jax.jit(
        lambda z, y, v, m: sepico.sepico_loss(
            "proto", z, y, v, mean=m, temperature=tau, reg_weight=0.5
        )
    )
    proto = _jitted("proto_contrastive", temperature=tau)(_FEATS, _LABELS, _VALID, _MEAN)
    np.testing.assert_allclose(
        float(both(_FEATS, _LABELS, _VALID, _MEAN)), float(proto) + 0.5 * expected, rtol=1e-6
    )


def test_bank_empty_class_is_no_negative_and_no_anchor():
    # Class 3's bank is empty: the loss equals the 3-class one with class 3's anchors invalid.
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(10, 2))
    labels = np.array([0, 1, 2, 3, 3, 0, 1, 2, 3, 0])
    valid = np.ones(10, bool)
    bank4 = np.concatenate([_BANK, rng.normal(size=(1, 3, 2))])
    bank_valid4 = np.concatenate([_BANK_VALID, np.zeros((1, 3), bool)])
    f = _jitted("bank_contrastive", temperature=0.5)
    got = f(feats, labels, valid, bank4, bank_valid4)
    want = f(feats, np.minimum(labels, 2), labels < 3, _BANK, _BANK_VALID)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    # ...which a filled class-3 bank changes.
    bank_valid4[3, 0] = True
    assert abs(float(f(feats, labels, valid, bank4, bank_valid4)) - float(got)) > 1e-3


# ------------------------------------------------------------------------------------------------
# Label downscaling


def _downscale_loop(labels, scale, num_classes, min_ratio, ignore=255):
    """The rule, one block at a time: the most frequent bin (labels outside [0, C) in the ignore
    bin, ties to the lowest id, the ignore bin last) and its share of the block."""
    b, h, w = labels.shape
    out = np.full((b, h // scale, w // scale), ignore)
    for n in range(b):
        for i in range(h // scale):
            for j in range(w // scale):
                block = labels[n, i * scale : (i + 1) * scale, j * scale : (j + 1) * scale]
                bins = np.where((block >= 0) & (block < num_classes), block, num_classes)
                counts = np.bincount(bins.ravel(), minlength=num_classes + 1)
                best = int(np.argmax(counts))
                if best != num_classes and counts[best] / scale**2 >= min_ratio:
                    out[n, i, j] = best
    return out


def _block_labels(rng, b, h, w, scale, num_classes):
    """Labels [b, h*scale (+ extra), ...] made of blocks of every purity: a block's label, with
    0..8 of its pixels changed to another class or to the ignore label."""
    blocks = rng.integers(0, num_classes, size=(b, h, w))
    full = np.repeat(np.repeat(blocks, scale, axis=1), scale, axis=2)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                k = rng.integers(0, 9)
                pick = rng.choice(scale * scale, size=k, replace=False)
                ys, xs = i * scale + pick // scale, j * scale + pick % scale
                noise = rng.integers(0, num_classes + 1, size=k)
                full[n, ys, xs] = np.where(noise == num_classes, 255, noise)
    full[0, :scale, :scale] = 255  # a void block
    full[0, :scale, scale : 2 * scale] = 255  # ignore majority: 13 void, 3 of class 1
    full[0, :3, scale] = 1
    return full


def test_downscale_labels_against_the_rule():
    rng = np.random.default_rng(1)
    labels = _block_labels(rng, 2, 5, 6, 4, num_classes=4)
    # The exact-threshold block: 12 of 16 pixels of class 2 is kept, 11 of 16 is not.
    labels[1, :4, :4] = 2
    labels[1, 0, :4] = 3
    labels[1, :4, 4:8] = 2
    labels[1, 0, 4:8], labels[1, 1, 4] = 3, 0
    # A label outside [0, C) votes with the ignore bin; rows and columns past a multiple of 4 go.
    labels[1, 4:8, :4] = 30
    labels = np.pad(labels, ((0, 0), (0, 3), (0, 2)), constant_values=1)
    f = jax.jit(sepico.downscale_labels, static_argnums=(1, 2, 3))
    got = np.asarray(f(labels, 4, 4, 0.75))
    np.testing.assert_array_equal(got, _downscale_loop(labels, 4, 4, 0.75))
    assert got.shape == (2, 5, 6) and got.dtype == np.int32
    assert got[1, 0, 0] == 2 and got[1, 0, 1] == 255 and got[1, 1, 0] == 255
    assert got[0, 0, 0] == 255 and got[0, 0, 1] == 255
    # Every case occurs: kept blocks, impure blocks and void-majority blocks.
    kept = got != 255
    assert 0.2 < kept.mean() < 0.95
    # The numpy transcription of the reference agrees (labels within [0, C) or 255 there).
    in_range = np.where(labels == 30, 255, labels)
    np.testing.assert_array_equal(
        got, ref.downscale_label_ratio(in_range[:, None], 4, 0.75, 4)[:, 0]
    )
    # Ties at min_ratio 0.5 go to the lower class id, and to a class before the ignore bin.
    tie = np.zeros((1, 2, 4), np.int64)
    tie[0, :, :2] = [[3, 3], [1, 1]]
    tie[0, :, 2:] = [[255, 255], [2, 2]]
    np.testing.assert_array_equal(np.asarray(f(tie, 2, 4, 0.5)), [[[1, 2]]])
    np.testing.assert_array_equal(np.asarray(f(tie, 2, 4, 0.75)), [[[255, 255]]])
    # Scale 1 leaves the labels as they are.
    np.testing.assert_array_equal(np.asarray(sepico.downscale_labels(labels, 1, 4)), labels)


_prepare = jax.jit(functools.partial(sepico.prepare_contrast, num_classes=4))


def test_prepare_contrast_checks_sizes():
    proj = np.zeros((1, 3, 4, 2), np.float32)
    labels = np.full((1, 12, 16), 255)
    labels[0, 4:8, 8:12] = 3
    feats, flat, valid = _prepare(proj, labels)
    assert feats.shape == (12, 2) and flat.shape == (12,)
    # Batch-major rows: block (1, 2) is row 1 * 4 + 2; ignored pixels get label 0.
    np.testing.assert_array_equal(np.asarray(valid), np.arange(12) == 6)
    np.testing.assert_array_equal(np.asarray(flat), np.where(np.arange(12) == 6, 3, 0))
    with pytest.raises(ValueError, match="integer multiple"):
        _prepare(proj, labels[:, :10])


# ------------------------------------------------------------------------------------------------
# Against the numpy transcription of the released functions


def _random_case(seed, b=2, h=3, w=4, a=5, scale=4, num_classes=4, bank_slots=5):
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(b, h, w, a))
    proj /= np.linalg.norm(proj, axis=-1, keepdims=True)  # unit-norm, as the projection head
    labels = _block_labels(rng, b, h, w, scale, num_classes)
    mean = rng.normal(size=(num_classes, a)) * 0.4
    mean[-1] = 0.0  # a class without statistics yet
    variance = rng.uniform(0.0, 0.5, size=(num_classes, a))
    bank = rng.normal(size=(num_classes, bank_slots, a)) * 0.4
    bank[:, 0] = 0.0  # the initial zero vector...
    bank_valid = (
        np.arange(bank_slots)[None, :] < rng.integers(1, bank_slots + 1, num_classes)[:, None]
    )
    bank_valid[0, 0] = False  # ...pushed out of class 0's bank
    bank_valid[0, 1] = True
    return proj, labels, dict(mean=mean, variance=variance, bank=bank, bank_valid=bank_valid)


def _reference(variant, proj, labels, stats, tau, ratio, reg_weight, num_classes=4):
    feat, mask = ref.contrast_preparations(proj.transpose(0, 3, 1, 2), labels[:, None], 0.75, 4)
    kw = dict(contrast_temp=tau, num_classes=num_classes, reg_weight=reg_weight)
    if variant == "proto":
        return ref.proto_contrastive(feat, mask, stats["mean"], **kw)
    if variant == "dist":
        return ref.dist_contrastive(feat, mask, stats["mean"], stats["variance"], ratio, **kw)
    bank = [stats["bank"][c][stats["bank_valid"][c]] for c in range(num_classes)]
    return ref.bank_contrastive(feat, mask, bank, stats["mean"], **kw)


def _prepared_loss_fn(proj, labels, stats, variant, tau, ratio, reg_weight):
    """Full-resolution labels and embeddings -> prepare_contrast -> sepico_loss."""
    feats, flat, valid = sepico.prepare_contrast(proj, labels, num_classes=4)
    kw = dict(temperature=tau, ratio=ratio, reg_weight=reg_weight)
    return sepico.sepico_loss(variant, feats, flat, valid, **stats, **kw)


_prepared_loss = jax.jit(_prepared_loss_fn, static_argnums=(3, 4, 5, 6))


@pytest.mark.parametrize(
    "variant, tau, ratio, reg_weight",
    [
        ("proto", 100.0, 1.0, 1.0),
        ("proto", 0.5, 1.0, 0.0),
        ("dist", 100.0, 1.0, 1.0),
        ("dist", 0.5, 1.0, 1.0),
        ("dist", 0.5, 0.7, 0.0),
        ("bank", 100.0, 1.0, 1.0),
        ("bank", 0.5, 1.0, 0.0),
    ],
)
def test_matches_numpy_transcription(variant, tau, ratio, reg_weight):
    with jax.enable_x64(True):
        for seed in (0, 1):
            proj, labels, stats = _random_case(seed)
            got = float(_prepared_loss(proj, labels, stats, variant, tau, ratio, reg_weight))
            want = _reference(variant, proj, labels, stats, tau, ratio, reg_weight)
            # float64: at tau = 100 the loss is log C + O(1e-3), so 1e-10 still checks the signal.
            np.testing.assert_allclose(got, want, rtol=1e-10)


def test_float32_matches_numpy_transcription():
    # float32 inputs compute in float32 and agree to float32 precision; one compiled function
    # for the three variants.
    proj, labels, stats = _random_case(0)
    stats32 = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in stats.items()}

    @jax.jit
    def all_variants(proj, labels, stats):
        return [_prepared_loss_fn(proj, labels, stats, v, 0.5, 1.0, 1.0) for v in sepico.VARIANTS]

    got = all_variants(proj.astype(np.float32), labels, stats32)
    for variant, value in zip(sepico.VARIANTS, got):
        assert value.dtype == jnp.float32
        want = _reference(variant, proj, labels, stats, 0.5, 1.0, 1.0)
        np.testing.assert_allclose(float(value), want, rtol=2e-5)


def test_regularizer_matches_numpy_transcription():
    proj, labels, stats = _random_case(2)
    feat, mask = ref.contrast_preparations(proj.transpose(0, 3, 1, 2), labels[:, None], 0.75, 4)
    with jax.enable_x64(True):
        feats, _, valid = _prepare(proj, labels)
        for tau in (100.0, 0.5):
            reg = _jitted("proto_regularizer", temperature=tau)
            got = float(reg(feats, valid, stats["mean"]))
            want = ref.proto_reg(feat, stats["mean"], tau, 4 * math.log(4))
            np.testing.assert_allclose(got, want, rtol=1e-10)
        # A float 0/1 mask is the same mask.
        np.testing.assert_allclose(
            float(reg(feats, np.asarray(valid, float), stats["mean"])), want, rtol=1e-10
        )


# ------------------------------------------------------------------------------------------------
# Gradients and the empty case


def _flat_case(seed):
    proj, labels, stats = _random_case(seed)
    feats, flat, valid = _prepare(proj, labels)
    return proj.reshape(-1, proj.shape[-1]), np.asarray(flat), np.asarray(valid), stats


_LOSSES = {
    "proto": lambda z, y, v, s, tau: sepico.proto_contrastive(z, y, v, s["mean"], tau),
    "dist": lambda z, y, v, s, tau: sepico.dist_contrastive(
        z, y, v, s["mean"], s["variance"], tau, 0.8
    ),
    "bank": lambda z, y, v, s, tau: sepico.bank_contrastive(
        z, y, v, s["bank"], s["bank_valid"], tau
    ),
    "reg": lambda z, y, v, s, tau: sepico.proto_regularizer(z, v, s["mean"], tau),
}


@pytest.mark.parametrize("name", sorted(_LOSSES))
def test_gradient_finite_differences(name):
    feats, labels, valid, stats = _flat_case(3)
    assert 0 < valid.sum() < valid.size
    with jax.enable_x64(True):
        f = jax.jit(jax.value_and_grad(lambda z: _LOSSES[name](z, labels, valid, stats, 0.5)))
        _, grad = f(feats)
        grad = np.asarray(grad)
        assert np.abs(grad).max() > 1e-3  # a non-trivial gradient...
        assert not grad[~valid].any()  # ...that never reaches an invalid pixel
        rng, step = np.random.default_rng(0), 1e-5
        for _ in range(3):
            v = rng.normal(size=feats.shape)
            numeric = (float(f(feats + step * v)[0]) - float(f(feats - step * v)[0])) / (2 * step)
            np.testing.assert_allclose(numeric, np.sum(grad * v), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("variant", sepico.VARIANTS)
def test_no_valid_pixel_gives_zero_and_zero_gradient(variant):
    feats, labels, _, stats = _flat_case(4)
    invalid = np.zeros(labels.shape, bool)

    def f(z):
        return sepico.sepico_loss(variant, z, labels, invalid, **stats, temperature=0.5)

    loss, grad = jax.jit(jax.value_and_grad(f))(feats.astype(np.float32))
    assert float(loss) == 0.0
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()
    # The reference gives 0 for an empty selection too.
    all_void = np.full((2, 12, 16), 255)
    assert _reference(variant, np.ones((2, 3, 4, 5)), all_void, stats, 0.5, 1.0, 1.0) == 0.0


def test_sepico_loss_rejects_bad_arguments():
    feats, labels, valid, stats = _flat_case(5)
    with pytest.raises(ValueError, match="variant must be one of"):
        sepico.sepico_loss("pixel", feats, labels, valid, mean=stats["mean"])
    with pytest.raises(ValueError, match="variance"):
        sepico.sepico_loss("dist", feats, labels, valid, mean=stats["mean"])
    with pytest.raises(ValueError, match="bank"):
        sepico.sepico_loss("bank", feats, labels, valid, mean=stats["mean"])
