"""Test oracle: a direct numpy (float64) transcription of PiPa's released pixel contrast
(`chen742/PiPa`, `PiPa_DAFormer/mmseg/models/decode_heads/decode_head.py: PixelContrastLoss`),
written for this project.

`hard_anchor_sampling` follows `_hard_anchor_sampling` loop by loop (classes per image from the
sorted unique labels, the `ignore_label` filter, the `> max_views` pixel threshold, `n_view`,
the hard / easy split and its fallbacks, the unreachable branch as an exception), with the
`torch.randperm` draws replaced by a callable. `contrastive` follows `_contrastive` step by step
(mask, `repeat`, the self-excluding logits mask, the negatives' sum, `log_prob`, the mean over
positives and over all rows).
"""

from __future__ import annotations

import numpy as np


def hard_anchor_sampling(X, y_hat, y, randperm, ignore_label=-1, max_samples=1024, max_views=100):  # noqa: N803 (the reference's names)
    """X [B, N, D], y_hat (labels) [B, N], y (predictions) [B, N].

    randperm(ii, cls_id, which, n, indices) returns a permutation of range(n) for image ii,
    class cls_id and which in ('hard', 'easy'); `indices` are the candidate pixels in
    increasing order (the release's `nonzero()`).

    Returns (X_ [T, n_view, D], y_ [T], picks), picks a list of (hard pixels, easy pixels) per
    anchor; (None, None, []) when no class qualifies, as the release returns (None, None).
    """
    X = np.asarray(X, np.float64)
    y_hat = np.asarray(y_hat)
    y = np.asarray(y)
    batch_size, feat_dim = X.shape[0], X.shape[-1]

    classes = []
    total_classes = 0
    for ii in range(batch_size):
        this_y = y_hat[ii]
        this_classes = np.unique(this_y)
        this_classes = [x for x in this_classes if x != ignore_label]
        this_classes = [x for x in this_classes if np.count_nonzero(this_y == x) > max_views]
        classes.append(this_classes)
        total_classes += len(this_classes)

    if total_classes == 0:
        return None, None, []

    n_view = max_samples // total_classes
    n_view = min(n_view, max_views)

    X_ = np.zeros((total_classes, n_view, feat_dim))
    y_ = np.zeros(total_classes)
    picks = []

    X_ptr = 0
    for ii in range(batch_size):
        this_y_hat = y_hat[ii]
        this_y = y[ii]
        for cls_id in classes[ii]:
            hard_indices = np.nonzero((this_y_hat == cls_id) & (this_y != cls_id))[0]
            easy_indices = np.nonzero((this_y_hat == cls_id) & (this_y == cls_id))[0]
            num_hard = hard_indices.shape[0]
            num_easy = easy_indices.shape[0]

            if num_hard >= n_view / 2 and num_easy >= n_view / 2:
                num_hard_keep = n_view // 2
                num_easy_keep = n_view - num_hard_keep
            elif num_hard >= n_view / 2:
                num_easy_keep = num_easy
                num_hard_keep = n_view - num_easy_keep
            elif num_easy >= n_view / 2:
                num_hard_keep = num_hard
                num_easy_keep = n_view - num_hard_keep
            else:
                raise RuntimeError(f"unreachable: {num_hard} {num_easy} {n_view}")

            perm = np.asarray(randperm(ii, cls_id, "hard", num_hard, hard_indices), np.int64)
            hard_indices = hard_indices[perm[:num_hard_keep]]
            perm = np.asarray(randperm(ii, cls_id, "easy", num_easy, easy_indices), np.int64)
            easy_indices = easy_indices[perm[:num_easy_keep]]
            indices = np.concatenate((hard_indices, easy_indices), axis=0)

            X_[X_ptr] = X[ii, indices, :]
            y_[X_ptr] = cls_id
            picks.append((hard_indices, easy_indices))
            X_ptr += 1

    return X_, y_, picks


def contrastive(feats_, labels_, temperature=0.1, base_temperature=0.07):
    """feats_ [A, V, D], labels_ [A] -> the released loss (float)."""
    feats_ = np.asarray(feats_, np.float64)
    anchor_num, n_view = feats_.shape[0], feats_.shape[1]

    labels_ = np.asarray(labels_).reshape(-1, 1)
    mask = (labels_ == labels_.T).astype(np.float64)

    contrast_count = n_view
    contrast_feature = np.concatenate([feats_[:, v] for v in range(n_view)], axis=0)

    anchor_feature = contrast_feature
    anchor_count = contrast_count

    anchor_dot_contrast = (anchor_feature @ contrast_feature.T) / temperature
    logits_max = anchor_dot_contrast.max(axis=1, keepdims=True)
    logits = anchor_dot_contrast - logits_max

    mask = np.tile(mask, (anchor_count, contrast_count))
    neg_mask = 1 - mask

    logits_mask = np.ones_like(mask)
    logits_mask[np.arange(anchor_num * anchor_count), np.arange(anchor_num * anchor_count)] = 0
    mask = mask * logits_mask

    neg_logits = np.exp(logits) * neg_mask
    neg_logits = neg_logits.sum(1, keepdims=True)
    exp_logits = np.exp(logits)
    log_prob = logits - np.log(exp_logits + neg_logits)
    with np.errstate(invalid="ignore"):  # 0 / 0 for a row without positives, as torch gives
        mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return float(loss.mean())
