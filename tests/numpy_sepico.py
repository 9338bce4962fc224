"""Test oracle: a direct numpy (float64) transcription of SePiCo's released contrastive losses
(`BIT-DA/SePiCo`, `mmseg/models/losses/contrastive_loss.py`), written for this project.

It follows the reference step by step on NCHW inputs: labels downscaled by one-hot + block
average + max (`downscale_label_ratio`), features and labels flattened batch-major and the ignored
pixels REMOVED (`contrast_preparations`), then the three criteria and `proto_reg` on what is left,
returning 0 for an empty selection. The memory bank is a list, one [L_c, A] array per class (the
reference's deques of [1, A] centroids, concatenated).
"""

from __future__ import annotations

import numpy as np


def downscale_label_ratio(gt_b1hw, scale, min_ratio, num_classes, ignore_index=255):
    """Labels [B, 1, H, W] -> [B, 1, H // scale, W // scale]."""
    gt = np.asarray(gt_b1hw).astype(np.int64)
    if scale == 1:
        return gt.copy()
    b, _, h, w = gt.shape
    th, tw = h // scale, w // scale
    out = gt[:, 0].copy()
    out[out == ignore_index] = num_classes  # the ignore label in an extra bin
    onehot = np.eye(num_classes + 1, dtype=np.float32)[out]  # [B, H, W, C + 1]
    onehot = onehot.transpose(0, 3, 1, 2)[:, :, : th * scale, : tw * scale]
    # avg_pool2d(kernel=stride=scale), floor mode: mean over each block.
    pooled = onehot.reshape(b, num_classes + 1, th, scale, tw, scale).mean(axis=(3, 5))
    ratio = pooled.max(axis=1)
    arg = pooled.argmax(axis=1)  # first maximum, as torch.max on CPU
    arg[arg == num_classes] = ignore_index
    arg[ratio < np.float32(min_ratio)] = ignore_index
    return arg[:, None]


def contrast_preparations(feat_nchw, mask_b1hw, scale_min_ratio, num_classes, ignore_index=255):
    """(feat [M, A], labels [M]) of the non-ignored pixels, batch-major."""
    feat = np.asarray(feat_nchw, np.float64)
    scale = mask_b1hw.shape[-1] // feat.shape[-1]
    mask = downscale_label_ratio(mask_b1hw, scale, scale_min_ratio, num_classes, ignore_index)
    a = feat.shape[1]
    feat = feat.transpose(0, 2, 3, 1).reshape(-1, a)
    mask = mask.reshape(-1)
    keep = mask != ignore_index
    return feat[keep], mask[keep]


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _cross_entropy(logits, labels):
    return -_log_softmax(logits)[np.arange(len(labels)), labels]


def proto_reg(feat, mean, contrast_temp, contrast_norm):
    if feat.shape[0] == 0:
        return 0.0
    mean_feat = feat.mean(axis=0, keepdims=True)  # [1, A]
    proto_sim = mean_feat @ np.asarray(mean, np.float64).T / contrast_temp  # [1, C]
    p = np.exp(_log_softmax(proto_sim))
    return float(np.log(p).sum() / contrast_norm)


def _with_reg(loss, feat, mean, contrast_temp, num_classes, reg_weight):
    if reg_weight > 0:
        norm = num_classes * np.log(num_classes)
        loss += reg_weight * proto_reg(feat, mean, contrast_temp, norm)
    return loss


def proto_contrastive(feat, mask, mean, contrast_temp=100.0, num_classes=19, reg_weight=0.0):
    """feat [M, A], mask [M] (already prepared)."""
    if feat.shape[0] == 0:
        return 0.0
    proto_sim = feat @ np.asarray(mean, np.float64).T / contrast_temp
    loss = float(_cross_entropy(proto_sim, mask).mean())
    return _with_reg(loss, feat, mean, contrast_temp, num_classes, reg_weight)


def dist_contrastive(
    feat, mask, mean, covariance, ratio=1.0, contrast_temp=100.0, num_classes=19, reg_weight=0.0
):
    if feat.shape[0] == 0:
        return 0.0
    mean = np.asarray(mean, np.float64)
    temp1 = feat @ mean.T
    covariance = np.asarray(covariance, np.float64) * ratio / contrast_temp
    temp2 = 0.5 * (feat**2) @ covariance.T
    logits = (temp1 + temp2) / contrast_temp
    ce_loss = _cross_entropy(logits, mask)
    # The positive class's variance term, added back.
    jcl_loss = 0.5 * np.sum(feat**2 * covariance[mask], axis=1) / contrast_temp
    loss = float((ce_loss + jcl_loss).mean())
    return _with_reg(loss, feat, mean, contrast_temp, num_classes, reg_weight)


def bank_contrastive(
    feat, mask, bank, mean=None, contrast_temp=100.0, num_classes=19, reg_weight=0.0
):
    """bank: list of C arrays [L_c, A] (each L_c >= 1)."""
    if feat.shape[0] == 0:
        return 0.0
    losses = []
    for cls in range(num_classes):
        cls_feat = feat[mask == cls]  # [Nc, A]
        pos, neg = None, []
        for idx in range(num_classes):
            cls_bank = np.asarray(bank[idx], np.float64)  # [L, A]
            bank_sim = cls_feat @ cls_bank.T / contrast_temp  # [Nc, L]
            if idx == cls:
                pos = bank_sim
            else:
                neg.append(bank_sim.mean(axis=1, keepdims=True))
        neg = np.concatenate(neg, axis=1)  # [Nc, C - 1]
        exp_pos = np.exp(pos)
        sum_exp_neg = np.exp(neg).sum(axis=1, keepdims=True)
        softmax_term = exp_pos / (exp_pos + sum_exp_neg)
        losses.append(-np.log(softmax_term).mean(axis=1))
    loss = float(np.concatenate(losses).mean())
    return _with_reg(loss, feat, mean, contrast_temp, num_classes, reg_weight)
