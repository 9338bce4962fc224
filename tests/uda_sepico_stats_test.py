"""SePiCo source statistics against the batch formulas over the whole history and against a numpy
transcription of the released `ProtoEstimator.update_proto` (memory bank deque included)."""

from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.uda.sepico_stats import init_stats, ordered_bank, update_stats

NUM_CLASSES, DIM, PIXELS = 5, 4, 48


class NumpyProtoEstimator:
    """`ProtoEstimator` as released, in float32 numpy: deque banks, one zero vector at start."""

    def __init__(self, dim, class_num, memory_length):
        self.class_num = class_num
        self.cov = np.zeros((class_num, dim), np.float32)
        self.ave = np.zeros((class_num, dim), np.float32)
        self.amount = np.zeros((class_num,), np.float32)
        self.bank = [
            deque([np.zeros(dim, np.float32)], maxlen=memory_length) for _ in range(class_num)
        ]

    def update_proto(self, features, labels):
        # features [N, A] float32 and labels [N] of valid pixels only (ignored ones removed).
        n_pix, _ = features.shape
        onehot = np.zeros((n_pix, self.class_num), np.float32)
        onehot[np.arange(n_pix), labels] = 1.0
        by_class = features[:, None, :] * onehot[:, :, None]  # [N, C, A]
        amount_ca = np.repeat(onehot.sum(0)[:, None], features.shape[1], axis=1)
        amount_ca[amount_ca == 0] = 1.0
        ave_b = by_class.sum(0) / amount_ca
        for cls in np.unique(labels):
            self.bank[cls].append(ave_b[cls].copy())
        var_b = np.square(by_class - ave_b[None] * onehot[:, :, None]).sum(0) / amount_ca
        n = np.repeat(onehot.sum(0)[:, None], features.shape[1], axis=1)
        with np.errstate(invalid="ignore"):
            w = n / (n + self.amount[:, None])
        w[np.isnan(w)] = 0.0
        extra = w * (1 - w) * np.square(self.ave - ave_b)
        self.cov = self.cov * (1 - w) + var_b * w + extra
        self.ave = self.ave * (1 - w) + ave_b * w
        self.amount = self.amount + onehot.sum(0)


def _updates(seed=0, steps=5):
    """Random batches: each step misses some classes, class 4 never occurs, some pixels are
    invalid (label 255, or a real label with valid=False)."""
    rng = np.random.default_rng(seed)
    batches = []
    for step in range(steps):
        present = [c for c in range(NUM_CLASSES - 1) if (c + step) % 3 != 0 or c == 0]
        labels = rng.choice(present, PIXELS).astype(np.int32)
        feats = (rng.normal(size=(PIXELS, DIM)) * 2.0 + 3.0).astype(np.float32)
        valid = rng.random(PIXELS) > 0.2
        labels[~valid & (rng.random(PIXELS) > 0.5)] = 255
        batches.append((feats, labels, valid))
    return batches


def test_streaming_equals_batch_formula_over_history():
    stats = init_stats(NUM_CLASSES, DIM)
    history = _updates(seed=1, steps=6)
    for feats, labels, valid in history:
        stats = update_stats(stats, feats, labels, valid)
    feats = np.concatenate([f for f, _, _ in history]).astype(np.float64)
    labels = np.concatenate([lab for _, lab, _ in history])
    valid = np.concatenate([v for _, _, v in history])
    for c in range(NUM_CLASSES):
        sel = feats[valid & (labels == c)]
        np.testing.assert_equal(float(stats["count"][c]), len(sel))
        if len(sel) == 0:
            np.testing.assert_array_equal(stats["mean"][c], 0.0)
            np.testing.assert_array_equal(stats["variance"][c], 0.0)
            continue
        np.testing.assert_allclose(stats["mean"][c], sel.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["variance"][c], sel.var(0), rtol=1e-5, atol=1e-5)
    assert float(stats["count"][NUM_CLASSES - 1]) == 0.0


@pytest.mark.parametrize("length", [1, 3])
def test_matches_released_update_proto_and_bank(length):
    ref = NumpyProtoEstimator(DIM, NUM_CLASSES, length)
    stats = init_stats(NUM_CLASSES, DIM, bank_length=length)
    update = jax.jit(update_stats)
    for feats, labels, valid in _updates(seed=2, steps=5):
        ref.update_proto(feats[valid], labels[valid])
        stats = update(stats, feats, labels, valid)
        np.testing.assert_allclose(stats["mean"], ref.ave, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats["variance"], ref.cov, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stats["count"], ref.amount)
        bank, bank_valid = ordered_bank(stats)
        for c in range(NUM_CLASSES):
            expected = np.stack(list(ref.bank[c]))
            n_held = int(bank_valid[c].sum())
            assert n_held == len(expected)
            assert bool(jnp.all(bank_valid[c, :n_held]))
            np.testing.assert_allclose(bank[c, :n_held], expected, rtol=1e-6, atol=1e-6)
    # The classes present in most steps have pushed the initial zero vector out.
    assert not np.any(np.all(np.stack(list(ref.bank[0])) == 0, axis=1))
    assert len(ref.bank[NUM_CLASSES - 1]) == 1


def test_jit_traces_once_and_keeps_shapes():
    traces = []

    def step(stats, feats, labels, valid):
        traces.append(None)
        return update_stats(stats, feats, labels, valid)

    step_jit = jax.jit(step)
    stats0 = init_stats(NUM_CLASSES, DIM, bank_length=3)
    eager = jit = stats0
    for feats, labels, valid in _updates(seed=3, steps=4):
        jit = step_jit(jit, feats, labels, valid)
        eager = update_stats(eager, feats, labels, valid)
    assert len(traces) == 1
    spec = jax.tree.map(lambda a: (a.shape, a.dtype), stats0)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), jit) == spec
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), jit, eager)


def test_absent_classes_unchanged_and_no_bank_without_length():
    stats = init_stats(NUM_CLASSES, DIM)
    assert set(stats) == {"mean", "variance", "count"}
    (f1, l1, v1), (f2, _, _) = _updates(seed=4, steps=2)
    stats = update_stats(stats, f1, l1, v1)
    only_zero = update_stats(stats, f2, np.zeros_like(l1), np.ones_like(v1))
    for key in ("mean", "variance", "count"):
        np.testing.assert_array_equal(only_zero[key][1:], stats[key][1:])
    assert float(only_zero["count"][0]) == float(stats["count"][0]) + PIXELS


def test_no_gradient_through_update():
    feats, labels, valid = _updates(seed=5, steps=1)[0]
    stats = init_stats(NUM_CLASSES, DIM, bank_length=2)

    def total(f):
        new = update_stats(stats, f, labels, valid)
        return new["mean"].sum() + new["variance"].sum() + new["bank"].sum()

    np.testing.assert_array_equal(jax.grad(total)(jnp.asarray(feats)), 0.0)


def test_init_rejects_bad_sizes():
    with pytest.raises(ValueError, match="bank_length"):
        init_stats(NUM_CLASSES, DIM, bank_length=-1)
