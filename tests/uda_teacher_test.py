"""EMA teacher and pseudo-labels against DAFormer's `dacs.py` (transcribed in torch here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pgpc_jax.uda import teacher


def _torch_ema(ema: np.ndarray, param: np.ndarray, it: int, alpha: float) -> np.ndarray:
    # DACS._init_ema_weights / _update_ema, one leaf.
    if it == 0:
        return param.copy()
    a = min(1 - 1 / (it + 1), alpha)
    return (a * torch.tensor(ema) + (1 - a) * torch.tensor(param)).numpy()


@pytest.mark.parametrize("step", [0, 1, 2, 3, 9, 500, 998, 999, 1000, 40000])
def test_ema_alpha_is_min_of_ramp_and_alpha(step):
    expected = np.float32(min(1 - 1 / (step + 1), 0.999))
    assert np.asarray(teacher.ema_alpha(step)) == expected
    assert np.asarray(jax.jit(teacher.ema_alpha)(step)) == expected


def test_update_teacher_matches_dacs():
    # The momenta are torch's float32 values bit for bit (test above); the update itself is
    # within one rounding of torch's, since XLA fuses a * t + (1 - a) * s into an FMA (torch rounds
    # the two products first). Each step is compared from the same previous teacher.
    rng = np.random.default_rng(0)
    student = {"a": {"w": rng.normal(size=(64, 5)).astype(np.float32)}, "b": np.float32(0.3)}
    # Garbage in the teacher before step 0 must not leak: step 0 is an exact copy.
    ours = {"a": {"w": np.full((64, 5), np.nan, np.float32)}, "b": np.float32(np.inf)}
    update = jax.jit(teacher.update_teacher, static_argnames="alpha")
    for it in [0, 1, 2, 3, 7, 998, 999, 1000, 1001, 39999]:
        student = jax.tree.map(
            lambda x: (x + rng.normal(size=np.shape(x))).astype(np.float32), student
        )
        prev_w, prev_b = np.asarray(ours["a"]["w"]), np.asarray(ours["b"])
        ref_w = _torch_ema(prev_w, student["a"]["w"], it, 0.999)
        ref_b = _torch_ema(prev_b, np.asarray(student["b"]), it, 0.999)
        ours = update(ours, student, it, alpha=0.999)
        assert ours["a"]["w"].dtype == jnp.float32
        if it == 0:
            np.testing.assert_array_equal(np.asarray(ours["a"]["w"]), student["a"]["w"])
            np.testing.assert_array_equal(np.asarray(ours["b"]), student["b"])
            continue
        a = min(1 - 1 / (it + 1), 0.999)
        for got, ref, t, s in [
            (ours["a"]["w"], ref_w, prev_w, student["a"]["w"]),
            (ours["b"], ref_b, prev_b, student["b"]),
        ]:
            # One float32 rounding of the larger product bounds an FMA-vs-two-roundings gap.
            bound = np.spacing(np.abs(a * t).astype(np.float32) + np.abs((1 - a) * s))
            assert np.all(np.abs(np.asarray(got) - ref) <= bound), it


def test_update_teacher_is_a_pure_function_of_step():
    # The same (teacher, student, step) always gives the same result: resuming is exact.
    t = {"w": jnp.arange(4.0)}
    s = {"w": jnp.ones(4)}
    update = jax.jit(teacher.update_teacher)
    a = update(t, s, 10)
    b = update(jax.tree.map(jnp.copy, t), s, jnp.int32(10))
    np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(b["w"]))
    alpha = np.float32(10 / 11)
    np.testing.assert_allclose(np.asarray(a["w"]), alpha * np.arange(4.0) + (1 - alpha), rtol=1e-6)


def test_update_teacher_passes_no_gradient_to_student():
    student = {"w": jnp.ones((3,))}
    grad = jax.grad(lambda s: jnp.sum(teacher.update_teacher({"w": jnp.zeros(3)}, s, 5)["w"]))(
        student
    )
    np.testing.assert_array_equal(np.asarray(grad["w"]), 0.0)


def _torch_pseudo(logits_nhwc: np.ndarray, thr: float, top: int, bottom: int):
    # The pseudo-label block of DACS.forward_train on NCHW logits.
    logits = torch.from_numpy(logits_nhwc).permute(0, 3, 1, 2)
    softmax = torch.softmax(logits, dim=1)
    prob, label = torch.max(softmax, dim=1)
    large = prob.ge(thr).long() == 1
    weight = torch.sum(large).item() / label.numel()  # np.size(np.array(label))
    weight = weight * torch.ones(prob.shape)
    if top > 0:
        weight[:, :top, :] = 0
    if bottom > 0:
        weight[:, -bottom:, :] = 0
    return label.numpy(), weight.numpy(), prob.numpy()


def _logits(batch=2, height=160, width=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    # Spread of confidences around 0.968: some pixels above, most below.
    return (rng.normal(size=(batch, height, width, k)) * 3.0).astype(np.float32)


def test_pseudo_labels_scalar_weight_matches_dacs():
    logits = _logits()
    labels, weight, stats = jax.jit(teacher.pseudo_labels)(logits)
    ref_label, ref_weight, ref_prob = _torch_pseudo(logits, 0.968, 15, 120)
    np.testing.assert_array_equal(np.asarray(labels), ref_label)
    np.testing.assert_allclose(np.asarray(weight), ref_weight, rtol=1e-7, atol=0)
    share = np.mean(ref_prob >= 0.968)
    assert 0.05 < share < 0.95, share  # the test data has both kinds of pixels
    np.testing.assert_allclose(float(stats["coverage"]), share, rtol=1e-6)
    np.testing.assert_allclose(float(stats["confidence"]), ref_prob.mean(), rtol=1e-6)
    # One value for the whole batch, on every row outside the cropped bands.
    kept = np.asarray(weight)[:, 15:-120]
    np.testing.assert_allclose(kept, share, rtol=1e-6)
    assert np.all(np.asarray(weight)[:, :15] == 0) and np.all(np.asarray(weight)[:, -120:] == 0)


def test_pseudo_weight_is_over_the_global_batch_not_per_image():
    logits = np.zeros((2, 4, 4, 3), np.float32)
    logits[0, ..., 1] = 20.0  # image 0: every pixel confident
    _, weight, _ = teacher.pseudo_labels(logits, ignore_top=0, ignore_bottom=0)
    np.testing.assert_allclose(np.asarray(weight), 0.5)


def test_pseudo_labels_per_pixel_option():
    logits = _logits(seed=1)
    _, weight, _ = teacher.pseudo_labels(logits, per_pixel=True)
    _, _, prob = _torch_pseudo(logits, 0.968, 15, 120)
    expected = (prob >= 0.968).astype(np.float32)
    expected[:, :15] = 0
    expected[:, -120:] = 0
    np.testing.assert_array_equal(np.asarray(weight), expected)


def test_pseudo_weight_bands_can_be_disabled():
    logits = _logits(height=8, seed=2)
    _, weight, _ = teacher.pseudo_labels(logits, threshold=0.0, ignore_top=0, ignore_bottom=0)
    np.testing.assert_array_equal(np.asarray(weight), 1.0)
    _, weight, _ = teacher.pseudo_labels(logits, threshold=0.0, ignore_top=2, ignore_bottom=3)
    np.testing.assert_array_equal(np.asarray(weight)[:, 2:5], 1.0)
    assert np.all(np.asarray(weight)[:, :2] == 0) and np.all(np.asarray(weight)[:, 5:] == 0)


def test_pseudo_weight_sharded_batch_equals_single_device():
    logits = _logits(batch=8, height=140, width=4, seed=3)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(logits, NamedSharding(mesh, P("data")))
    _, w_sharded, _ = jax.jit(teacher.pseudo_labels)(sharded)
    _, w_single, _ = teacher.pseudo_labels(logits)
    np.testing.assert_array_equal(np.asarray(w_sharded), np.asarray(w_single))
