"""Contrast losses: golden values derived by hand, gradients against finite differences, CLUDA's
loss against a numpy transcription of the released formula (`tests/numpy_cluda.py`), the
prototype EMA, the fixed-size samplers, permutation invariance and sharded == unsharded."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax import sharding
from pgpc_jax.losses.contrast import (
    cluda_loss,
    embed_features,
    init_prototypes,
    labels_to_grid,
    pgpc_loss,
    sample_class_balanced,
    sample_uniform,
    update_prototypes,
    values_to_grid,
)
from tests.numpy_cluda import cluda_contrastive_loss


def _unit(deg):
    rad = np.deg2rad(np.asarray(deg, np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=-1)


def _cos(a, b):
    return math.cos(math.radians(a - b))


def _check_grad_central_difference(f, x, num_directions=4, step=1e-5):
    """The analytic gradient of scalar `f` at float64 `x` against central differences along
    random directions (one compiled function serves value and gradient)."""
    value_and_grad = jax.jit(jax.value_and_grad(f))
    _, grad = value_and_grad(x)
    grad = np.asarray(grad)
    assert np.abs(grad).max() > 1e-3  # a non-trivial gradient
    rng = np.random.default_rng(0)
    for _ in range(num_directions):
        v = rng.normal(size=x.shape)
        plus, _ = value_and_grad(x + step * v)
        minus, _ = value_and_grad(x - step * v)
        numeric = (float(plus) - float(minus)) / (2 * step)
        np.testing.assert_allclose(numeric, np.sum(grad * v), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Embedding on the grid


def test_embed_features_shapes_and_align_corners():
    rng = np.random.default_rng(0)
    sizes, chans = [(16, 12), (8, 6), (4, 3), (2, 2)], [2, 3, 4, 5]
    feats = [rng.normal(size=(2, h, w, c)).astype(np.float32) for (h, w), c in zip(sizes, chans)]
    feats[0][..., 0] = np.arange(16, dtype=np.float32)[None, :, None]  # a ramp along rows
    out = np.asarray(embed_features(feats, (9, 7)))
    assert out.shape == (2, 9, 7, 14)
    # Upsampling with align_corners=False keeps the corner pixels, and align_corners=True maps
    # corners onto corners: the grid's corners are the stages' corners.
    for i, j in [(0, 0), (-1, -1), (0, -1), (-1, 0)]:
        np.testing.assert_allclose(out[:, i, j], np.concatenate([f[:, i, j] for f in feats], -1))
    # align_corners=True on a ramp: row r samples source row r * (16 - 1) / (9 - 1).
    np.testing.assert_allclose(out[0, :, 3, 0], np.arange(9) * 15 / 8, rtol=1e-6)
    # ...which align_corners=False would not give (the test can fail).
    assert not np.allclose(out[0, 1, 3, 0], (1 + 0.5) * 16 / 9 - 0.5)


def test_labels_and_values_to_grid():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 20, size=(2, 512, 300))
    out = np.asarray(labels_to_grid(labels, (65, 65)))
    rows = np.floor(np.arange(65) * 512 / 65).astype(int)
    cols = np.floor(np.arange(65) * 300 / 65).astype(int)
    np.testing.assert_array_equal(out, labels[:, rows][:, :, cols])
    ramp = np.broadcast_to(np.arange(33, dtype=np.float32)[None, :, None], (1, 33, 5))
    vals = np.asarray(values_to_grid(ramp, (9, 4)))
    np.testing.assert_allclose(vals[0, :, 2], np.arange(9) * 32 / 8, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# CLUDA


def test_cluda_golden():
    # Three pixels, B=1: (1,0) class 0, (0,1) class 0, (-1,0) class 1; magnitudes vary.
    feats = np.array([[[[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]]]], np.float32)  # [1, 1, 3, 2]
    labels = np.array([[[0, 0, 1]]])
    # logits = cos - 1. Anchor 0: positive l=-1, negative l=-2; anchor 1: positive l=-1,
    # negative l=-1 (log p = -log 2); anchor 2 has no positive and counts 0 in the mean of 3.
    log_p0 = -1.0 - math.log(math.exp(-1.0) + math.exp(-2.0))
    log_p1 = -math.log(2.0)
    expected = -(log_p0 + log_p1) / 3
    np.testing.assert_allclose(float(cluda_loss(feats, labels)), expected, rtol=1e-6)
    # Weights multiply log p by w_i * w_j; the temperature only scales the loss.
    w = np.array([[[0.5, 0.8, 3.0]]], np.float32)
    np.testing.assert_allclose(float(cluda_loss(feats, labels, w)), 0.4 * expected, rtol=1e-6)
    got = cluda_loss(feats, labels, temperature=0.5, base_temperature=2.0)
    np.testing.assert_allclose(float(got), 0.25 * expected, rtol=1e-6)


def _cluda_inputs(seed, batch, h=3, w=4, c=5, classes=3):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(batch, h, w, c)).astype(np.float32)
    labels = rng.integers(0, classes, size=(batch, h, w))
    labels[rng.random(labels.shape) < 0.2] = 255
    weights = rng.uniform(0.2, 1.0, size=(batch, h, w)).astype(np.float32)
    return feats, labels, weights


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("quirk", [False, True])
def test_cluda_matches_numpy_transcription(batch, weighted, quirk):
    feats, labels, weights = _cluda_inputs(batch * 10 + weighted, batch)
    w = weights if weighted else None
    got = cluda_loss(feats, labels, w, order_quirk=quirk)
    ref = cluda_contrastive_loss(
        feats.transpose(0, 3, 1, 2),
        labels[:, None],
        None if w is None else w[:, None],
        intended_order=not quirk,
    )
    np.testing.assert_allclose(float(got), ref, rtol=2e-5)


def test_cluda_quirk_changes_value_only_for_batch_above_one():
    for batch in (1, 2):
        feats, labels, weights = _cluda_inputs(7, batch)
        plain = float(cluda_loss(feats, labels, weights))
        quirk = float(cluda_loss(feats, labels, weights, order_quirk=True))
        if batch == 1:
            np.testing.assert_allclose(quirk, plain, rtol=1e-6)
        else:
            assert abs(quirk - plain) > 1e-3 * abs(plain)


def test_cluda_permutation_invariant():
    feats, labels, weights = _cluda_inputs(3, 2)
    perm = np.random.default_rng(0).permutation(24)
    f2 = feats.reshape(24, 5)[perm].reshape(feats.shape)
    l2, w2 = labels.reshape(24)[perm].reshape(labels.shape), weights.reshape(24)[perm]
    np.testing.assert_allclose(
        float(cluda_loss(f2, l2, w2.reshape(weights.shape))),
        float(cluda_loss(feats, labels, weights)),
        rtol=1e-5,
    )


def test_cluda_gradient_finite_differences():
    feats, labels, weights = _cluda_inputs(5, 2, h=2, w=3, c=3)
    with jax.enable_x64(True):
        f = functools.partial(cluda_loss, labels=labels, weights=weights.astype(np.float64))
        _check_grad_central_difference(f, feats.astype(np.float64))


# ------------------------------------------------------------------------------------------------
# Prototypes and samplers


def test_update_prototypes_first_seen_ema_and_absent():
    protos = init_prototypes(4, 2)
    protos = {
        "mean": protos["mean"].at[1].set(jnp.array([1.0, 0.0])).at[3].set(jnp.array([0.0, 2.0])),
        "seen": protos["seen"].at[1].set(True).at[3].set(True),
    }
    z = np.array([[0.0, 1.0], [0.0, 3.0], [1.0, 1.0], [5.0, 5.0], [7.0, 7.0]], np.float32)
    labels = np.array([0, 1, 1, 255, 2])
    reliable = np.array([True, True, True, True, False])
    new = update_prototypes(protos, z, labels, reliable, momentum=0.9)
    mean = np.asarray(new["mean"])
    np.testing.assert_allclose(mean[0], [0.0, 1.0])  # first seen: the batch mean
    np.testing.assert_allclose(mean[1], 0.9 * np.array([1.0, 0.0]) + 0.1 * np.array([0.5, 2.0]))
    np.testing.assert_allclose(mean[2], [0.0, 0.0])  # only an unreliable pixel: still unseen
    np.testing.assert_allclose(mean[3], [0.0, 2.0])  # absent: unchanged
    np.testing.assert_array_equal(np.asarray(new["seen"]), [True, True, False, True])
    assert new["mean"].dtype == jnp.float32


def test_sample_class_balanced_round_robin():
    labels = np.concatenate([np.zeros(100), np.ones(10), np.full(2, 2), np.full(30, 1)]).astype(int)
    eligible = np.concatenate([np.ones(112, bool), np.zeros(30, bool)])
    sample = jax.jit(sample_class_balanced, static_argnums=(3, 4))
    idx, ok = sample(jax.random.key(0), labels, eligible, 12, 3)
    idx, ok = np.asarray(idx), np.asarray(ok)
    assert ok.all() and len(set(idx.tolist())) == 12 and eligible[idx].all()
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=3), [5, 5, 2])
    # More slots than eligible pixels: every eligible pixel once, the rest invalid.
    idx, ok = sample(jax.random.key(1), labels, eligible, 130, 3)
    assert sorted(np.asarray(idx)[np.asarray(ok)].tolist()) == list(range(112))


def test_sample_uniform():
    eligible = np.zeros(50, bool)
    eligible[[3, 7, 20, 41]] = True
    idx, ok = sample_uniform(jax.random.key(0), eligible, 6)
    assert np.asarray(ok).sum() == 4
    assert sorted(np.asarray(idx)[np.asarray(ok)].tolist()) == [3, 7, 20, 41]
    idx, ok = sample_uniform(jax.random.key(0), eligible, 2)
    assert np.asarray(ok).all() and eligible[np.asarray(idx)].all()


# ------------------------------------------------------------------------------------------------
# PGPC: golden values on 2-D embeddings at known angles

# pixel: label, angle (deg), radius, confidence, is_target, valid, ruled_in (teacher top-2)
_PIXELS = [
    (0, 20, 2.0, 1.00, False, True, (0, 0)),  # 0 reliable source
    (0, -40, 0.5, 0.99, True, True, (0, 1)),  # 1 reliable target
    (1, 150, 1.0, 1.00, False, True, (1, 1)),  # 2 reliable source
    (1, 100, 3.0, 0.97, True, True, (1, 0)),  # 3 reliable target
    (2, 0, 1.0, 0.50, True, True, (2, 0)),  # 4 unreliable: rules out class 1 only
    (1, 60, 1.0, 0.30, True, True, (1, 2)),  # 5 unreliable: rules out class 0 only
    (0, 90, 1.0, 1.00, False, False, (0, 0)),  # 6 invalid: never used
    (255, 45, 1.0, 1.00, False, True, (0, 0)),  # 7 ignore label: never used
    (1, 170, 1.0, 1.00, False, True, (1, 1)),  # 8 reliable source
]
_ANGLE = {i: p[1] for i, p in enumerate(_PIXELS)}
# Negatives counted for each anchor, by hand: reliable pixels of another class, and unreliable
# pixels whose top-2 does not contain the anchor's class.
_PIXEL_NEG = {0: [2, 3, 8], 1: [2, 3, 8], 2: [0, 1], 3: [0, 1], 8: [0, 1]}
_UNREL_NEG = {0: [5], 1: [5], 2: [4], 3: [4], 8: [4]}
_POS = {0: [1], 1: [0], 2: [3, 8], 3: [2, 8], 8: [2, 3]}
_CLASS = {0: 0, 1: 0, 2: 1, 3: 1, 8: 1}


def _golden_inputs():
    cols = list(zip(*_PIXELS))
    emb = (_unit(cols[1]) * np.asarray(cols[2])[:, None]).astype(np.float32)
    return dict(
        emb=emb,
        labels=np.asarray(cols[0]),
        confidence=np.asarray(cols[3], np.float32),
        is_target=np.asarray(cols[4]),
        valid=np.asarray(cols[5]),
        ruled_in=np.asarray(cols[6]),
    )


def _infonce(anchor_angle, pos_vec, neg_angles, tau):
    # -log(e^p / (e^p + sum e^n)) = log(1 + sum exp(n - p)), p, n cosines over tau.
    a = _unit(anchor_angle)
    p = float(a @ pos_vec) / tau
    return math.log(1.0 + sum(math.exp(_cos(anchor_angle, k) / tau - p) for k in neg_angles))


@functools.cache
def _jit_pgpc(kw_items, with_grad):
    # One compiled function per hyperparameter set, shared by the tests that use it.
    def loss_fn(emb, rng, inputs, protos):
        loss, new, stats = pgpc_loss(rng, emb, **inputs, protos=protos, **dict(kw_items))
        return loss, (new, stats)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True) if with_grad else loss_fn)


def _run_pgpc(inputs, protos, rng=0, with_grad=False, **kw):
    """(loss, new prototypes, stats), and the gradient wrt emb if `with_grad`."""
    kw.setdefault("num_classes", 3)
    rest = {k: v for k, v in inputs.items() if k != "emb"}
    f = _jit_pgpc(tuple(sorted(kw.items())), with_grad)
    out = f(inputs["emb"], jax.random.key(rng), rest, protos)
    if with_grad:
        (loss, (new, stats)), grad = out
        return loss, new, stats, grad
    loss, (new, stats) = out
    return loss, new, stats


@pytest.mark.parametrize("source_anchors, unreliable", [(True, True), (False, False)])
def test_pgpc_prototype_golden(source_anchors, unreliable):
    tau = 0.5
    inputs = _golden_inputs()
    loss, protos, stats = _run_pgpc(
        inputs,
        init_prototypes(3, 2),
        temperature=tau,
        source_anchors=source_anchors,
        unreliable_negatives=unreliable,
    )
    # First seen: the prototype is the mean of the class's reliable unit vectors.
    proto = {0: _unit([20, -40]).mean(0), 1: _unit([150, 100, 170]).mean(0)}
    np.testing.assert_allclose(
        np.asarray(protos["mean"])[:2], np.stack([proto[0], proto[1]]), atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(protos["seen"]), [True, True, False])
    anchors = [0, 1, 2, 3, 8] if source_anchors else [1, 3]
    terms = []
    for a in anchors:
        negs = [_ANGLE[k] for k in _PIXEL_NEG[a] + (_UNREL_NEG[a] if unreliable else [])]
        pos = proto[_CLASS[a]] / np.linalg.norm(proto[_CLASS[a]])
        terms.append(_infonce(_ANGLE[a], pos, negs, tau))
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
    assert float(stats["contrast/anchors"]) == len(anchors)
    np.testing.assert_allclose(
        float(stats["contrast/negatives"]), np.mean([len(_PIXEL_NEG[a]) for a in anchors])
    )
    assert float(stats["contrast/unreliable"]) == (1.0 if unreliable else 0.0)
    np.testing.assert_allclose(float(stats["contrast/reliable_share"]), 5 / 8)


def test_pgpc_pixel_golden():
    tau = 0.2
    loss, _, stats = _run_pgpc(
        _golden_inputs(), init_prototypes(3, 2), temperature=tau, positives="pixel"
    )
    terms = []
    for a in [0, 1, 2, 3, 8]:
        negs = [_ANGLE[k] for k in _PIXEL_NEG[a] + _UNREL_NEG[a]]
        per_pos = [_infonce(_ANGLE[a], _unit(_ANGLE[j]), negs, tau) for j in _POS[a]]
        terms.append(np.mean(per_pos))
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(float(stats["contrast/positives"]), (1 + 1 + 2 + 2 + 2) / 5)


def test_pgpc_absent_and_prototype_less_classes_contribute_nothing():
    inputs = _golden_inputs()
    kw = dict(temperature=0.5, source_anchors=True, unreliable_negatives=True)  # as the golden test
    base, _, stats = _run_pgpc(inputs, init_prototypes(3, 2), **kw)
    # Class 2 appears only as an unreliable pixel: no prototype, no anchor (5 anchors, not 6).
    assert float(stats["contrast/anchors"]) == 5
    # A prototype for class 2 from earlier steps (absent from this batch) changes nothing.
    protos = init_prototypes(3, 2)
    protos = {
        "mean": protos["mean"].at[2].set(jnp.array([0.3, -0.7])),
        "seen": protos["seen"].at[2].set(True),
    }
    other, new, _ = _run_pgpc(inputs, protos, **kw)
    np.testing.assert_allclose(float(other), float(base), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["mean"])[2], [0.3, -0.7])


@pytest.mark.parametrize("positives", ["prototype", "pixel"])
def test_pgpc_no_valid_anchor_gives_zero_and_zero_grad(positives):
    inputs = _golden_inputs()
    inputs["confidence"] = np.zeros_like(inputs["confidence"])  # nothing reliable
    protos = init_prototypes(3, 2)
    loss, _, stats, grad = _run_pgpc(inputs, protos, with_grad=True, positives=positives)
    assert float(loss) == 0.0 and float(stats["contrast/anchors"]) == 0
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def _random_pgpc_inputs(seed, n, dim=4, classes=4, topk=2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    labels[rng.random(n) < 0.1] = 255
    is_target = rng.random(n) < 0.5
    confidence = np.where(is_target, rng.uniform(0.9, 1.0, size=n), 1.0).astype(np.float32)
    return dict(
        emb=rng.normal(size=(n, dim)).astype(np.float32),
        labels=labels,
        confidence=confidence,
        is_target=is_target,
        valid=rng.random(n) < 0.9,
        ruled_in=np.stack([rng.permutation(classes)[:topk] for _ in range(n)]),
    )


def _seen_protos(seed, classes=4, dim=4):
    mean = np.random.default_rng(seed).normal(size=(classes, dim)).astype(np.float32)
    return {"mean": jnp.asarray(mean), "seen": jnp.ones((classes,), bool)}


@pytest.mark.parametrize("positives", ["prototype", "pixel"])
def test_pgpc_permutation_invariant(positives):
    n = 40
    inputs = _random_pgpc_inputs(0, n)
    kw = dict(num_classes=4, positives=positives, num_anchors=64, num_negatives=64)
    kw.update(num_unreliable=64, reliable_threshold=0.95)
    loss, protos, _ = _run_pgpc(inputs, init_prototypes(4, 4), **kw)
    perm = np.random.default_rng(1).permutation(n)
    loss_p, protos_p, _ = _run_pgpc(
        {k: v[perm] for k, v in inputs.items()}, init_prototypes(4, 4), rng=5, **kw
    )
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(protos_p["mean"]), np.asarray(protos["mean"]), atol=1e-6)
    assert float(loss) > 0


@pytest.mark.parametrize("positives", ["prototype", "pixel"])
def test_pgpc_gradient_finite_differences(positives):
    inputs = _random_pgpc_inputs(2, 24)
    emb = inputs.pop("emb").astype(np.float64)
    with jax.enable_x64(True):
        # momentum 1 on seen prototypes: they do not move with emb, so the loss is a function of
        # emb alone (the prototype update is under stop_gradient by design).
        f = functools.partial(
            pgpc_loss,
            jax.random.key(0),
            **inputs,
            protos=_seen_protos(3),
            num_classes=4,
            prototype_momentum=1.0,
            reliable_threshold=0.95,
            num_anchors=8,
            num_negatives=10,
            num_unreliable=4,
            positives=positives,
        )
        _check_grad_central_difference(lambda e: f(e)[0], emb)


# ------------------------------------------------------------------------------------------------
# Sharded == unsharded


def test_sharded_equals_unsharded():
    mesh = sharding.make_mesh(8)
    batched, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    # CLUDA on 8 images of 3x3 grid pixels, one image per device.
    feats, labels, weights = _cluda_inputs(11, 8, h=3, w=3, c=4)
    f_cluda = jax.jit(jax.value_and_grad(functools.partial(cluda_loss, order_quirk=True)))
    ref = f_cluda(feats, labels, weights)
    got = f_cluda(*(jax.device_put(x, batched) for x in (feats, labels, weights)))
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(ref[1]), rtol=0, atol=1e-6)

    # PGPC with real sampling: more candidates than slots.
    inputs = _random_pgpc_inputs(4, 256)
    emb = inputs.pop("emb")
    kw = dict(num_classes=4, num_anchors=32, num_negatives=48, num_unreliable=16)
    kw.update(reliable_threshold=0.95)

    def loss_fn(emb, rest, protos, rng):
        loss, new, stats = pgpc_loss(rng, emb, **rest, protos=protos, **kw)
        return loss, (new, stats)

    f_pgpc = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    protos, rng = _seen_protos(5), jax.random.key(3)
    (ref_loss, (ref_new, ref_stats)), ref_grad = f_pgpc(emb, inputs, protos, rng)
    sharded_args = (
        jax.device_put(emb, batched),
        jax.device_put(inputs, batched),
        jax.device_put(protos, replicated),
        jax.device_put(rng, replicated),
    )
    (loss, (new, stats)), grad = f_pgpc(*sharded_args)
    assert float(ref_loss) > 0 and float(ref_stats["contrast/anchors"]) == 32
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["mean"]), np.asarray(ref_new["mean"]), atol=1e-6)
    for k in ref_stats:
        np.testing.assert_allclose(float(stats[k]), float(ref_stats[k]), rtol=1e-6)


def test_majority_labels_to_grid():
    from pgpc_jax.losses.contrast import majority_labels_to_grid

    # 6x6 -> 2x2: each cell is a 3x3 block; the majority wins, void wins a mostly-void cell,
    # ties go to the lower class.
    labels = np.full((1, 6, 6), 255, np.int32)
    labels[0, :3, :3] = [[1, 1, 2], [1, 2, 2], [1, 1, 3]]  # 1 x5
    labels[0, :3, 3:] = [[4, 4, 4], [5, 5, 5], [255, 255, 255]]  # 4 x3, 5 x3, void x3 -> 4
    labels[0, 3:, :3] = [[255, 255, 255], [255, 255, 255], [0, 0, 0]]  # void x6
    labels[0, 3:, 3:] = [[7, 7, 7], [7, 7, 7], [6, 6, 6]]  # 7 x6
    got = np.asarray(majority_labels_to_grid(labels, (2, 2), num_classes=19))
    np.testing.assert_array_equal(got, [[[1, 4], [255, 7]]])
    # A grid finer than the input keeps one pixel per cell, like the nearest rule.
    small = np.arange(12, dtype=np.int32).reshape(1, 3, 4) % 19
    np.testing.assert_array_equal(
        np.asarray(majority_labels_to_grid(small, (5, 7), num_classes=19)),
        np.asarray(labels_to_grid(small, (5, 7))),
    )
