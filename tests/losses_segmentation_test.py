"""Cross-entropy against mmseg 0.16 as DAFormer runs it: F.interpolate (bilinear,
align_corners=False) of the stride-4 logits, F.cross_entropy(reduction='none',
ignore_index=255) times the pixel weight, mean over all pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgpc_jax.losses.segmentation import cross_entropy


def _torch_ce(logits_nhwc, labels, weight):
    logits = torch.tensor(logits_nhwc.transpose(0, 3, 1, 2), requires_grad=True)
    up = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, torch.tensor(labels).long(), reduction="none", ignore_index=255)
    if weight is not None:
        loss = loss * torch.tensor(weight)
    loss = loss.mean()
    loss.backward()
    return loss.item(), logits.grad.numpy().transpose(0, 2, 3, 1)


def _data(seed, b=2, h=9, w=13, k=19, scale=4):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(b, h, w, k)) * 2).astype(np.float32)
    labels = rng.integers(0, k, size=(b, h * scale - 1, w * scale + 2))  # not a multiple of 4
    labels[rng.uniform(size=labels.shape) < 0.2] = 255
    weight = rng.uniform(size=labels.shape).astype(np.float32)
    return logits, labels.astype(np.int32), weight


@pytest.mark.parametrize("use_weight", [True, False])
def test_cross_entropy_matches_mmseg_value_and_gradient(use_weight):
    logits, labels, weight = _data(0)
    weight = weight if use_weight else None
    loss, grad = jax.jit(jax.value_and_grad(cross_entropy))(logits, labels, weight)
    ref_loss, ref_grad = _torch_ce(logits, labels, weight)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-8)


def test_ignored_pixels_count_in_the_denominator():
    logits = np.zeros((1, 2, 2, 4), np.float32)  # uniform: CE = log 4 per pixel
    labels = np.full((1, 8, 8), 255, np.int32)
    labels[0, :4] = 1  # half the pixels labelled
    loss = cross_entropy(logits, labels)
    np.testing.assert_allclose(float(loss), 0.5 * np.log(4.0), rtol=1e-6)
    weight = np.zeros((1, 8, 8), np.float32)
    weight[0, :2] = 1.0  # a quarter of the pixels weighted
    np.testing.assert_allclose(
        float(cross_entropy(logits, labels, weight)), 0.25 * np.log(4.0), rtol=1e-6
    )


def test_all_ignored_gives_zero_loss_and_gradient():
    logits = np.random.default_rng(1).normal(size=(1, 3, 3, 5)).astype(np.float32)
    labels = np.full((1, 12, 12), 255, np.int32)
    loss, grad = jax.value_and_grad(cross_entropy)(logits, labels)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_cross_entropy_bfloat16_logits_compute_in_float32():
    logits, labels, weight = _data(2)
    loss = cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels, weight)
    assert loss.dtype == jnp.float32
    ref, _ = _torch_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), labels, weight)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
