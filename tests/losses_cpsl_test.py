"""CPSL's losses: the Sinkhorn's released properties and its numbers against a numpy transcription
of `CustomModel.sinkhorn` (`tests/numpy_cpsl.py`), the rectification on a hand-computed case and
against the transcription, RCE against its closed form, L_CTS, float64 finite-difference
gradients of the self-labelling loss, and the self-labelling block over several steps with ring
buffers against the released shifting queues."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.losses import cpsl
from pgpc_jax.uda import ring_buffer
from tests import numpy_cpsl as ref

_PRIOR = np.array([0.5, 0.3, 0.15, 0.05])


@functools.cache
def _jitted(name, **static):
    return jax.jit(functools.partial(getattr(cpsl, name), **static))


def _sinkhorn(epsilon, iters):
    return _jitted("sinkhorn", epsilon=epsilon, iters=iters)


def _scores(seed, rows=24, classes=4, scale=1.0):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (rows, classes)) * scale


# ------------------------------------------------------------------------------------------------
# Sinkhorn


def test_sinkhorn_rows_sum_to_one():
    # The released final `Q *= B` after the column normalisation: every sample's row sums to 1.
    q = np.asarray(_sinkhorn(0.05, 3)(_scores(0).astype(np.float32), _PRIOR))
    assert q.dtype == np.float32 and q.shape == (24, 4)
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)
    # ...while the class shares are not yet the prior after 3 iterations at this scale.
    assert np.abs(q.mean(axis=0) - _PRIOR).max() > 0.01


def test_sinkhorn_marginals_approach_the_prior():
    scores = _scores(1, rows=64, scale=0.5)
    with jax.enable_x64(True):
        errors = []
        for iters in (1, 3, 10, 30):
            q = np.asarray(_sinkhorn(0.05, iters)(scores, _PRIOR))
            np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
            errors.append(np.abs(q.mean(axis=0) - _PRIOR).max())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-3


@pytest.mark.parametrize("epsilon, iters", [(0.05, 3), (0.1, 10)])
def test_sinkhorn_matches_numpy_transcription(epsilon, iters):
    prior = np.random.default_rng(2).dirichlet(np.ones(5))
    with jax.enable_x64(True):
        for seed in (3, 4):
            scores = _scores(seed, rows=30, classes=5)
            got = np.asarray(_sinkhorn(epsilon, iters)(scores, prior))
            np.testing.assert_allclose(got, ref.sinkhorn(scores, prior, epsilon, iters), rtol=1e-12)
    # float32 (the released dtype) to float32 precision.
    scores = _scores(5, rows=30, classes=5).astype(np.float32)
    got = np.asarray(_sinkhorn(epsilon, iters)(scores, prior.astype(np.float32)))
    want = ref.sinkhorn(scores.astype(np.float64), prior, epsilon, iters)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_sinkhorn_large_scores_stay_finite():
    # Scores above 88.7 * eps overflow the released float32 exponent; the shift by each class's
    # maximum keeps the released numbers (the float64 transcription, where exp(120) is finite).
    scores = (_scores(6) * 1.5 + 4.5).astype(np.float32)  # in [3, 6]
    with np.errstate(over="ignore", invalid="ignore"):
        released32 = ref.sinkhorn(scores, _PRIOR.astype(np.float32), 0.05, 3)
    assert not np.isfinite(released32).all()
    for iters in (0, 3):
        got = np.asarray(_sinkhorn(0.05, iters)(scores, _PRIOR))
        want = ref.sinkhorn(scores.astype(np.float64), _PRIOR, 0.05, iters)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_sinkhorn_valid_mask_is_the_subset_and_bank_order_is_irrelevant():
    scores = _scores(7, rows=20)
    valid = np.random.default_rng(8).random(20) < 0.6
    valid[-4:] = True
    with jax.enable_x64(True):
        f = _sinkhorn(0.05, 3)
        every = np.ones(20, bool)
        got = np.asarray(f(scores, _PRIOR, valid=valid))
        np.testing.assert_allclose(got[valid], ref.sinkhorn(scores[valid], _PRIOR, 0.05, 3), 1e-12)
        assert not got[~valid].any()
        # Nothing valid: zeros, not NaN.
        assert not np.asarray(f(scores, _PRIOR, valid=np.zeros(20, bool))).any()
        # The last 4 rows' assignment does not depend on the order of the 16 rows before them.
        perm = np.random.default_rng(9).permutation(16)
        shuffled = np.concatenate([scores[:16][perm], scores[16:]])
        got, again = f(shuffled, _PRIOR, valid=every), f(scores, _PRIOR, valid=every)
        np.testing.assert_allclose(np.asarray(got)[16:], np.asarray(again)[16:], rtol=1e-12)
    # No gradient reaches the scores (released @torch.no_grad).
    grad = jax.jit(jax.grad(lambda s: jnp.sum(cpsl.sinkhorn(s, _PRIOR)[:, 0])))(scores)
    assert not np.asarray(grad).any()


# ------------------------------------------------------------------------------------------------
# Rectification


def test_rectify_hand_computed():
    p_sl = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    p_st = np.array([[0.1, 0.4, 0.5], [0.6, 0.3, 0.1]])
    # Products: [.05, .12, .10] -> class 1, normalised max .12 / .27 = .444;
    #           [.06, .03, .08] -> class 2, normalised max .08 / .17 = .471.
    # argmax of P_ST alone would give 2 and 0; of P_SL alone 0 and 2.
    np.testing.assert_array_equal(np.asarray(_jitted("rectify")(p_sl, p_st)), [1, 2])
    np.testing.assert_array_equal(np.asarray(_jitted("rectify")(p_sl, p_st, 0.45)), [255, 2])
    np.testing.assert_array_equal(
        np.asarray(_jitted("rectify", ignore_index=250)(p_sl, p_st, 0.5)), [250, 250]
    )


def test_rectify_matches_numpy_transcription():
    rng = np.random.default_rng(10)
    feats = rng.normal(size=(2, 3, 5, 8))
    protos = rng.normal(size=(6, 8))
    soft = rng.dirichlet(np.ones(6), size=(2, 3, 5))
    with jax.enable_x64(True):
        p_sl = np.asarray(_jitted("prototype_probabilities")(feats, protos, 0.08))
    # The transcription's P_SL: softmax over classes of normalised f . normalised W / T.
    cos = np.einsum(
        "nhwd,kd->nhwk",
        feats / np.linalg.norm(feats, axis=-1, keepdims=True),
        protos / np.linalg.norm(protos, axis=-1, keepdims=True),
    )
    e = np.exp(cos / 0.08 - (cos / 0.08).max(-1, keepdims=True))
    np.testing.assert_allclose(p_sl, e / e.sum(-1, keepdims=True), rtol=1e-12)
    product = p_sl * soft
    median = float(np.median(product.max(-1) / product.sum(-1)))  # half the pixels fall below
    for thred in (0.0, median):
        want = ref.rectify(p_sl.transpose(0, 3, 1, 2), soft.transpose(0, 3, 1, 2), thred, 255)
        got = np.asarray(_jitted("rectify")(p_sl, soft, thred))
        np.testing.assert_array_equal(got, want[:, 0])
    assert (got == 255).any() and (got != 255).any()


# ------------------------------------------------------------------------------------------------
# RCE and L_CTS


def _cts_case(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 3, 4, 5))
    labels = rng.integers(0, 5, size=(2, 3, 4))
    labels[0, 0, :3] = 255
    return logits, labels


def test_rce_closed_form():
    logits, labels = _cts_case(11)
    with jax.enable_x64(True):
        got = float(_jitted("rce_loss")(logits, labels))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    keep = labels != 255
    p_y = np.take_along_axis(p, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    want = np.sum(-math.log(1e-4) * (1.0 - p_y) * keep) / (keep.sum() + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # A confident correct pixel costs ~ -log(1e-4) * (C - 1) * 1e-7 (the softmax floor).
    confident = np.array([[30.0, -30.0, -30.0]])
    got = float(_jitted("rce_loss")(confident, np.array([0])))
    np.testing.assert_allclose(got, -math.log(1e-4) * 2e-7 / (1 + 1e-6), rtol=1e-4)
    # Every pixel ignored: 0 (the released + 1e-6).
    assert float(_jitted("rce_loss")(logits, np.full(labels.shape, 255))) == 0.0


def test_rce_and_cts_match_numpy_transcription():
    logits, labels = _cts_case(12)
    nchw = logits.transpose(0, 3, 1, 2)
    with jax.enable_x64(True):
        rce = float(_jitted("rce_loss")(logits, labels))
        cts = float(_jitted("cts_loss")(logits, labels))
        ce = float(_jitted("cross_entropy_loss")(logits, labels))
    np.testing.assert_allclose(rce, ref.rce(nchw, labels, 255), rtol=1e-12)
    np.testing.assert_allclose(ce, ref.cross_entropy(nchw, labels, 255), rtol=1e-12)
    want = 0.1 * ref.cross_entropy(nchw, labels, 255) + 1.0 * ref.rce(nchw, labels, 255)
    np.testing.assert_allclose(cts, want, rtol=1e-12)
    assert float(_jitted("cross_entropy_loss")(logits, np.full(labels.shape, 255))) == 0.0


# ------------------------------------------------------------------------------------------------
# Self-labelling


def _directional_check(f, x, seed):
    # Central differences along 3 random directions against the autodiff gradient.
    _, grad = f(x)
    grad = np.asarray(grad)
    assert np.abs(grad).max() > 1e-3
    rng, step = np.random.default_rng(seed), 1e-5
    for _ in range(3):
        v = rng.normal(size=x.shape)
        numeric = (float(f(x + step * v)[0]) - float(f(x - step * v)[0])) / (2 * step)
        np.testing.assert_allclose(numeric, np.sum(grad * v), rtol=1e-6, atol=1e-9)


def test_self_labelling_loss_gradient_finite_differences():
    # The assignment rows are separate inputs here, so the loss is smooth in `scores`.
    scores, assign, bank = _scores(13, rows=6), _scores(14, rows=6), _scores(15, rows=9)
    with jax.enable_x64(True):
        for bank_valid in (False, True):
            f = jax.jit(
                jax.value_and_grad(
                    lambda s, v=bank_valid: cpsl.self_labelling_loss(
                        s, assign, bank, v, _PRIOR, temperature=0.5
                    )
                )
            )
            _directional_check(f, scores, 16)


def test_cpsl_self_labelling_gradient_holds_the_assignment_fixed():
    # The released q is computed under no_grad from W itself; the gradient with respect to W is
    # that of the cross-entropy against q frozen at the current W (finite differences of the
    # frozen loss), not of the full composition.
    rng = np.random.default_rng(17)
    feats, logits = rng.normal(size=(6, 8)), rng.normal(size=(6, 4))
    protos = rng.normal(size=(4, 8))
    feat_bank = ref._normalize(rng.normal(size=(10, 8)), 1)
    logit_bank = ref._normalize(rng.normal(size=(10, 4)), 1)
    f_n = ref._normalize(feats, 1)
    with jax.enable_x64(True):
        for full in (False, True):

            def loss(w, full=full):
                t1, t2, _, _ = cpsl.cpsl_self_labelling_losses(
                    feats, logits, w, feat_bank, logit_bank, full, _PRIOR, temperature=0.5
                )
                return t1 + t2

            # q of both terms at the current W, from the transcription.
            s = f_n @ ref._normalize(protos, 1).T
            rows1, rows2 = [s], [ref._normalize(logits, 1)]
            if full:
                rows1.insert(0, feat_bank @ protos.T)
                rows2.insert(0, logit_bank)
            q = sum(ref.sinkhorn(np.concatenate(r), _PRIOR, 0.05, 3)[-6:] for r in (rows1, rows2))

            def frozen(w, q=q):
                log_p = jax.nn.log_softmax(cpsl.prototype_scores(f_n, w) / 0.5, axis=-1)
                return -jnp.mean(jnp.sum(q * log_p, axis=-1))

            value, grad = jax.jit(jax.value_and_grad(loss))(protos)
            np.testing.assert_allclose(float(value), float(frozen(protos)), rtol=1e-12)
            f_frozen = jax.jit(jax.value_and_grad(frozen))
            np.testing.assert_allclose(np.asarray(grad), f_frozen(protos)[1], rtol=1e-10)
            _directional_check(f_frozen, protos, 18)


def test_self_labelling_loss_is_cross_entropy_against_the_assignment():
    scores = _scores(15, rows=6)
    bank = _scores(16, rows=9)
    with jax.enable_x64(True):
        got = float(_jitted("self_labelling_loss")(scores, scores, bank, True, _PRIOR))
        empty = float(_jitted("self_labelling_loss")(scores, scores, bank, False, _PRIOR))
        alone = float(_jitted("self_labelling_loss")(scores, scores, None, None, _PRIOR))
    q = ref.sinkhorn(np.concatenate([bank, scores]), _PRIOR, 0.05, 3)[-6:]
    want = -np.mean(np.sum(q * ref._log_softmax(scores / 0.08, 1), axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    q = ref.sinkhorn(scores, _PRIOR, 0.05, 3)
    want_alone = -np.mean(np.sum(q * ref._log_softmax(scores / 0.08, 1), axis=1))
    np.testing.assert_allclose([empty, alone], want_alone, rtol=1e-12)
    assert abs(got - empty) > 1e-3  # the bank changes the assignment


def test_self_labelling_steps_match_the_released_queues():
    # Three steps of 2 images x 4 sampled pixels with banks of 12 rows: the banks are unused until
    # full (step 2, image 1), then wrap around; the ring buffers give the shifting queues' loss.
    num_img, fbs, dim, classes, length = 2, 4, 6, 4, 12
    rng = np.random.default_rng(17)
    protos = rng.normal(size=(classes, dim))
    queue, queue_out = np.zeros((length, dim)), np.zeros((length, classes))

    @jax.jit
    def step(feat_buf, logit_buf, feats, logits):
        total = 0.0
        for i in range(num_img):
            full = ring_buffer.is_full(feat_buf)
            t1, t2, f_rows, l_rows = cpsl.cpsl_self_labelling_losses(
                feats[i], logits[i], protos, feat_buf["feats"], logit_buf["feats"], full, _PRIOR
            )
            total = total + t1 + t2
            keep = jnp.ones(fbs, bool)
            feat_buf = ring_buffer.push(feat_buf, f_rows, keep, jnp.zeros(fbs, jnp.int32))
            logit_buf = ring_buffer.push(logit_buf, l_rows, keep)
        return total / num_img, feat_buf, logit_buf

    with jax.enable_x64(True):
        feat_buf = ring_buffer.init_buffer(length, dim, jnp.float64)
        logit_buf = ring_buffer.init_buffer(length, classes, jnp.float64, with_labels=False)
        for _ in range(3):
            feats = rng.normal(size=(num_img, fbs, dim))
            logits = rng.normal(size=(num_img, fbs, classes)) * 3.0
            got, feat_buf, logit_buf = step(feat_buf, logit_buf, feats, logits)
            want = ref.self_labelling_batch(
                feats, logits, protos, queue, queue_out, _PRIOR, 0.08, 0.05, 3
            )
            np.testing.assert_allclose(float(got), want, rtol=1e-11)
        # Same bank content as the shifting queues, in another order.
        for buf, q in ((feat_buf, queue), (logit_buf, queue_out)):
            np.testing.assert_allclose(
                np.sort(np.asarray(buf["feats"]), axis=0), np.sort(q, axis=0), rtol=1e-14
            )
