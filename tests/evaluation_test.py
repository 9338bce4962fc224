"""Tests for pgpc_jax.evaluation: confusion matrix and mIoU against cityscapesscripts and numpy,
sharding, whole-image inference against torch, sliding windows against mmseg's loop."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from configs import tiny
from data_pipelines import labels
from pgpc_jax import evaluation, scores, sharding
from pgpc_jax.models import segmentor

K = labels.NUM_CLASSES


def _random_pair(rng, shape, ignore_share=0.1, accuracy=0.7):
    """Blocky label [B, H, W] with ignore pixels, and a prediction right on ~`accuracy`."""
    b, h, w = shape
    label = rng.integers(0, K, (b, h // 8, w // 8)).repeat(8, 1).repeat(8, 2)
    label = np.where(rng.random(shape) < ignore_share, 255, label)
    noise = rng.integers(0, K, shape)
    pred = np.where(rng.random(shape) < accuracy, np.where(label == 255, noise, label), noise)
    return pred.astype(np.int32), label.astype(np.int32)


def _numpy_mean_iou(preds, gts, num_classes, ignore_index=255):
    """mmseg `intersect_and_union` / `total_intersect_and_union` / `mean_iou`, in numpy."""
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for pred, gt in zip(preds, gts):
        mask = gt != ignore_index
        pred, gt = pred[mask], gt[mask]
        hist = functools.partial(np.histogram, bins=num_classes, range=(0, num_classes - 1))
        area_inter = hist(pred[pred == gt])[0]
        area_union = hist(pred)[0] + hist(gt)[0] - area_inter
        inter, union = inter + area_inter, union + area_union
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return np.nanmean(iou), iou


def test_confusion_matrix_matches_numpy_and_skips_ignored():
    rng = np.random.default_rng(0)
    pred, label = _random_pair(rng, (3, 40, 56))
    label[0, :4, :4] = 200  # neither a class nor ignore_index: not counted, as mmseg's histc
    cm = np.asarray(jax.jit(scores.confusion_matrix, static_argnums=2)(pred, label, K))
    expected = np.zeros((K, K), np.int64)
    valid = label < K
    np.add.at(expected, (label[valid], pred[valid]), 1)
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int32
    assert cm.sum() == valid.sum()
    # The prediction at ignored pixels does not matter.
    pred2 = np.where(label == 255, (pred + 1) % K, pred)
    np.testing.assert_array_equal(scores.confusion_matrix(pred2, label, K), cm)


def test_confusion_matrix_sharded_equals_unsharded():
    assert jax.device_count() == 8
    rng = np.random.default_rng(1)
    pred, label = _random_pair(rng, (8, 24, 32))
    mesh = sharding.make_mesh()
    spec = NamedSharding(mesh, P("data"))
    cm_fn = jax.jit(scores.confusion_matrix, static_argnums=2)
    sharded = cm_fn(jax.device_put(pred, spec), jax.device_put(label, spec), K)
    single = scores.confusion_matrix(pred, label, K)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_miou_matches_mmseg_formula_and_subsets():
    rng = np.random.default_rng(2)
    pred, label = _random_pair(rng, (4, 32, 48))
    label[label == 7] = 255  # class 7: absent from the labels ...
    pred[pred == 7] = 8  # ... and from the predictions: NaN, left out of the mean
    pred[pred == 9] = 10  # class 9: in the labels, never predicted: IoU 0
    cm = np.asarray(scores.confusion_matrix(pred, label, K))
    miou, iou = scores.miou_from_confusion(cm)
    expected_miou, expected_iou = _numpy_mean_iou(pred, label, K)
    np.testing.assert_allclose(iou, expected_iou, rtol=1e-12)
    assert np.isnan(iou[7]) and iou[9] == 0
    assert miou == pytest.approx(expected_miou, rel=1e-12)
    miou16, _ = scores.miou_from_confusion(cm, labels.MIOU16_CLASSES)
    miou13, _ = scores.miou_from_confusion(cm, labels.MIOU13_CLASSES)
    assert miou16 == pytest.approx(np.nanmean(iou[list(labels.MIOU16_CLASSES)]))
    assert miou13 == pytest.approx(np.nanmean(iou[list(labels.MIOU13_CLASSES)]))
    assert len(labels.MIOU16_CLASSES) == 16 and len(labels.MIOU13_CLASSES) == 13


def test_miou16_is_readme_rescaling_when_synthia_classes_score_zero():
    rng = np.random.default_rng(3)
    pred, label = _random_pair(rng, (2, 32, 48), ignore_share=0.0)
    for c in (9, 14, 16):  # a SYNTHIA model never predicts terrain, truck, train
        pred[pred == c] = 0
    cm = np.asarray(scores.confusion_matrix(pred, label, K))
    miou19, iou = scores.miou_from_confusion(cm)
    assert not np.isnan(iou).any() and (iou[[9, 14, 16]] == 0).all()
    miou16, _ = scores.miou_from_confusion(cm, labels.MIOU16_CLASSES)
    assert miou16 == pytest.approx(miou19 * 19 / 16)


def test_miou_matches_cityscapesscripts(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs
    from cityscapesscripts.helpers.labels import trainId2label

    rng = np.random.default_rng(4)
    pred, label = _random_pair(rng, (3, 64, 128))
    to_label_id = np.zeros(256, np.uint8)  # train id -> label id; 255 -> 0 'unlabeled'
    for train_id, lab in trainId2label.items():
        if 0 <= train_id < K:
            to_label_id[train_id] = lab.id
    pred_files, gt_files = [], []
    for i in range(len(pred)):
        pred_files.append(str(tmp_path / f"city_000000_{i:06d}_pred.png"))
        gt_files.append(str(tmp_path / f"city_000000_{i:06d}_gtFine_labelIds.png"))
        Image.fromarray(to_label_id[pred[i]]).save(pred_files[-1])
        Image.fromarray(to_label_id[label[i]]).save(gt_files[-1])
    for key, value in dict(
        evalInstLevelScore=False, evalPixelAccuracy=False, JSONOutput=False, quiet=True
    ).items():
        monkeypatch.setattr(cs.args, key, value)
    result = cs.evaluateImgLists(pred_files, gt_files, cs.args)

    metrics = scores.metrics_from_confusion(np.asarray(scores.confusion_matrix(pred, label, K)))
    for train_id, name in enumerate(labels.CLASSES):
        theirs = result["classScores"][trainId2label[train_id].name]
        assert metrics[scores.metric_name(name)] == pytest.approx(theirs, rel=1e-12), name
    assert metrics["eval/miou"] == pytest.approx(result["averageScoreClasses"], rel=1e-12)


@functools.lru_cache(maxsize=1)
def _tiny_model():
    model = segmentor.build_segmentor(tiny.get_config().model)
    return model, segmentor.init_variables(model, jax.random.key(0))


# Jitted: op-by-op dispatch of the model would dominate the test time.
_whole = jax.jit(evaluation.whole_inference, static_argnums=(0, 3))


def test_whole_inference_matches_torch_interpolate_twice():
    model, variables = _tiny_model()
    images = np.random.default_rng(5).normal(size=(2, 36, 52, 3)).astype(np.float32)
    label_size = (75, 101)
    logits = _whole(model, variables, jnp.asarray(images), label_size)
    stride4 = jax.jit(model.apply)(variables, images)["logits"]  # [B, 9, 13, K]
    x = torch.from_numpy(np.array(stride4)).permute(0, 3, 1, 2).double()
    x = F.interpolate(x, size=(36, 52), mode="bilinear", align_corners=False)  # encode_decode
    x = F.interpolate(x, size=label_size, mode="bilinear", align_corners=False)  # rescale=True
    assert logits.shape == (2, *label_size, K)
    np.testing.assert_allclose(np.asarray(logits), x.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "image_size, crop, stride",
    [((64, 96), (32, 32), (21, 21)), ((50, 70), (32, 48), (16, 40)), ((20, 30), (32, 32), (8, 8))],
)
def test_slide_windows_cover_every_pixel(image_size, crop, stride):
    windows = evaluation.slide_windows(image_size, crop, stride)
    assert evaluation.window_counts(image_size, crop, stride).min() >= 1
    crop_hw = (min(crop[0], image_size[0]), min(crop[1], image_size[1]))
    for y1, y2, x1, x2 in windows:
        assert (y2 - y1, x2 - x1) == crop_hw
        assert 0 <= y1 and y2 <= image_size[0] and 0 <= x1 and x2 <= image_size[1]
    assert max(w[1] for w in windows) == image_size[0]
    assert max(w[3] for w in windows) == image_size[1]


def _mmseg_slide_numpy(window_fn, img, crop, stride, num_classes):
    """mmseg `EncoderDecoder.slide_inference` (rescale=False), transcribed to numpy NCHW."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = np.zeros((batch_size, num_classes, h_img, w_img))
    count_mat = np.zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_seg_logit = window_fn(img[:, :, y1:y2, x1:x2])
            pad = ((0, 0), (0, 0), (y1, preds.shape[2] - y2), (x1, preds.shape[3] - x2))
            preds += np.pad(crop_seg_logit, pad)
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


@pytest.mark.parametrize("windows_per_call", [1, 3])
def test_sliding_window_logits_match_mmseg_loop(windows_per_call):
    num_classes = 5
    rng = np.random.default_rng(6)
    weights = rng.normal(size=(3, num_classes)).astype(np.float32)
    images = rng.normal(size=(2, 50, 70, 3)).astype(np.float32)

    def window_jax(x):  # depends on the position inside the window, so misplacement shows
        h, w = x.shape[1:3]
        ramp = jnp.arange(h)[:, None, None] * 0.1 + jnp.arange(w)[None, :, None] * 0.01
        return jnp.tanh(x @ weights) + ramp * jnp.arange(1, num_classes + 1)

    def window_numpy(x_nchw):
        x = np.transpose(x_nchw, (0, 2, 3, 1))
        return np.transpose(np.asarray(window_jax(jnp.asarray(x))), (0, 3, 1, 2))

    crop, stride = (32, 48), (16, 40)
    ours = jax.jit(
        lambda im: evaluation.sliding_window_logits(
            window_jax, im, crop, stride, num_classes, windows_per_call
        )
    )(images)
    expected = _mmseg_slide_numpy(
        window_numpy, images.transpose(0, 3, 1, 2), crop, stride, num_classes
    )
    np.testing.assert_allclose(np.asarray(ours), expected.transpose(0, 2, 3, 1), atol=1e-5)


def test_slide_inference_equals_whole_when_crop_covers_image():
    model, variables = _tiny_model()
    images = jnp.asarray(np.random.default_rng(7).normal(size=(1, 32, 48, 3)), jnp.float32)
    slide = jax.jit(evaluation.slide_inference, static_argnums=(0, 3, 4, 5, 6))(
        model, variables, images, (64, 64), (32, 32), K, (40, 60)
    )
    whole = _whole(model, variables, images, (40, 60))
    np.testing.assert_allclose(np.asarray(slide), np.asarray(whole), atol=1e-6)


def test_evaluate_sharded_with_visualizations(tmp_path, monkeypatch):
    # Room for one batch of labels in the int32 matrix: it is flushed to the host after each.
    monkeypatch.setattr(evaluation, "_INT32_MAX", 8 * 64 * 96 + 1)
    model, variables = _tiny_model()
    rng = np.random.default_rng(8)
    batches = []
    for _ in range(2):
        _, label = _random_pair(rng, (8, 64, 96))
        batches.append(dict(image=rng.normal(size=(8, 32, 48, 3)).astype(np.float32), label=label))
    batches[0]["label"][0] = 255  # a padding example: counts nothing, not visualised
    mesh = sharding.make_mesh()
    metrics, table = evaluation.evaluate(
        model,
        sharding.replicate(variables, mesh),  # the mesh is found from the variables
        batches,
        K,
        num_visualizations=3,
        visualization_dir=str(tmp_path / "vis"),
    )
    # The same counts from single-device whole inference, argmax and numpy.
    cm = np.zeros((K, K), np.int64)
    for batch in batches:
        logits = _whole(model, variables, batch["image"], (64, 96))
        pred = np.asarray(jnp.argmax(logits, -1))
        valid = batch["label"] != 255
        np.add.at(cm, (batch["label"][valid], pred[valid]), 1)
    expected = scores.metrics_from_confusion(cm)
    assert metrics["eval/num_pixels"] == cm.sum()
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-12, err_msg=key)
    assert {"eval/miou", "eval/miou16", "eval/miou13", "eval/iou/traffic_light"} <= set(metrics)
    assert sorted(os.listdir(tmp_path / "vis")) == [
        f"{i:04d}_{w}.png" for i in range(3) for w in ("label", "pred")
    ]
    first_label = np.asarray(Image.open(tmp_path / "vis" / "0000_label.png"))
    np.testing.assert_array_equal(first_label, labels.colorize(batches[0]["label"][1]))
    assert "| traffic light |" in table and "mIoU16" in table
    assert f"{100 * metrics['eval/miou']:.2f}" in table
