"""ImageNet feature distance against a torch transcription of DAFormer's `calc_feat_dist`,
`masked_feat_dist` (`mmseg/models/uda/dacs.py`) and `downscale_label_ratio`
(`mmseg/utils/utils.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.labels import THING_CLASSES
from pgpc_jax.uda.feature_distance import downscale_label_ratio, feature_distance


def _torch_downscale(gt, scale, min_ratio, n_classes, ignore=255):
    # gt: [B, 1, H, W] long.
    out = gt.clone()
    out[out == ignore] = n_classes
    out = F.one_hot(out.squeeze(1), num_classes=n_classes + 1).permute(0, 3, 1, 2)
    out = F.avg_pool2d(out.float(), kernel_size=scale)
    ratio, out = torch.max(out, dim=1, keepdim=True)
    out[out == n_classes] = ignore
    out[ratio < min_ratio] = ignore
    return out


def _torch_feat_dist(f_student, f_imnet, labels, classes, min_ratio=0.75, n_classes=19):
    # NHWC numpy in, as DACS.calc_feat_dist on NCHW: returns (loss, grad wrt student).
    fs = torch.tensor(f_student.transpose(0, 3, 1, 2), requires_grad=True)
    fi = torch.tensor(f_imnet.transpose(0, 3, 1, 2))
    gt = torch.tensor(labels[:, None]).long()
    scale = gt.shape[-1] // fs.shape[-1]
    gt_rescaled = _torch_downscale(gt, scale, min_ratio, n_classes).long()
    mask = torch.any(gt_rescaled[..., None] == torch.tensor(classes), -1)
    dist = torch.norm(fs - fi, dim=1, p=2)[mask.squeeze(1)]
    loss = torch.mean(dist)
    loss.backward()
    return loss.item(), fs.grad.numpy().transpose(0, 2, 3, 1)


def _labels(rng, batch=2, height=32, width=48, cell=8):
    """Cell-structured labels: pure thing / stuff cells, 80 % and 60 % pure cells, ignore."""
    labels = np.zeros((batch, height, width), np.int64)
    for b in range(batch):
        for i in range(height // cell):
            for j in range(width // cell):
                major = rng.choice([0, 2, 6, 13, 18, 255])
                block = np.full((cell, cell), major)
                purity = rng.choice([1.0, 0.8, 0.75, 0.6])
                n_other = int(round((1 - purity) * cell * cell))
                block.flat[rng.permutation(cell * cell)[:n_other]] = rng.choice([1, 11, 255])
                labels[b, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = block
    return labels


@pytest.mark.parametrize("shape, scale", [((32, 48), 8), ((35, 50), 8), ((16, 16), 4)])
def test_downscale_label_ratio_matches_daformer(shape, scale):
    rng = np.random.default_rng(0)
    labels = _labels(rng, height=32, width=48)[:, : shape[0], : shape[1]]
    if labels.shape[1:] != shape:  # sizes that do not divide: pad with a class
        labels = np.pad(labels, ((0, 0), (0, shape[0] - 32), (0, shape[1] - 48)), constant_values=3)
    ours = jax.jit(downscale_label_ratio, static_argnums=(1, 2, 3))(labels, scale, 0.75, 19)
    ref = _torch_downscale(torch.tensor(labels[:, None]), scale, 0.75, 19)[:, 0].numpy()
    np.testing.assert_array_equal(np.asarray(ours), ref)
    kept = np.asarray(ours)
    assert (kept == 255).any() and (kept != 255).any()


def test_feature_distance_matches_daformer_value_and_gradient():
    rng = np.random.default_rng(1)
    labels = _labels(rng)
    fs = rng.normal(size=(2, 4, 6, 16)).astype(np.float32)
    fi = rng.normal(size=(2, 4, 6, 16)).astype(np.float32)
    fs[0, 0, 0] = fi[0, 0, 0]  # a kept-or-not cell with zero distance: the norm's kink
    loss, grad = jax.jit(jax.value_and_grad(feature_distance))(fs, fi, labels)
    ref_loss, ref_grad = _torch_feat_dist(fs, fi, labels, list(THING_CLASSES))
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-7)
    assert np.isfinite(np.asarray(grad)).all()


def test_feature_distance_stops_gradient_to_imagenet_features():
    rng = np.random.default_rng(2)
    labels = _labels(rng)
    fs = rng.normal(size=(2, 4, 6, 8)).astype(np.float32)
    fi = rng.normal(size=(2, 4, 6, 8)).astype(np.float32)
    grad = jax.grad(feature_distance, argnums=1)(fs, fi, labels)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_feature_distance_is_zero_without_thing_cells():
    # DAFormer's mean over an empty selection is NaN; here it is 0 with a zero gradient.
    labels = np.zeros((2, 32, 48), np.int64)  # road only
    fs = np.ones((2, 4, 6, 8), np.float32)
    fi = np.zeros((2, 4, 6, 8), np.float32)
    loss, grad = jax.value_and_grad(feature_distance)(fs, fi, labels)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    ref_loss, _ = _torch_feat_dist(fs, fi, labels, list(THING_CLASSES))
    assert np.isnan(ref_loss)


def test_feature_distance_equal_features_give_zero_and_finite_gradient():
    # At step 0 the student is the ImageNet encoder: every distance is 0, the norm's gradient
    # must be 0 (torch's subgradient), not NaN.
    labels = np.full((1, 16, 16), 13, np.int64)
    f = np.random.default_rng(3).normal(size=(1, 2, 2, 4)).astype(np.float32)
    loss, grad = jax.value_and_grad(feature_distance)(f, f, labels)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_feature_distance_accepts_bfloat16_features():
    rng = np.random.default_rng(4)
    labels = np.full((1, 16, 16), 6, np.int64)
    fs = jnp.asarray(rng.normal(size=(1, 2, 2, 4)), jnp.bfloat16)
    fi = jnp.asarray(rng.normal(size=(1, 2, 2, 4)), jnp.bfloat16)
    loss = feature_distance(fs, fi, labels)
    assert loss.dtype == jnp.float32
    diff = np.asarray(fs, np.float32) - np.asarray(fi, np.float32)
    np.testing.assert_allclose(float(loss), np.linalg.norm(diff, axis=-1).mean(), rtol=1e-6)
