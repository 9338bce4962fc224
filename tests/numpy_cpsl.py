"""Test oracle: a direct numpy transcription of CPSL's released stage-1 pieces (lslrh/CPSL,
`models/adaptation_modelv2.py`), written for this project.

It follows the reference step by step in its own layout: the Sinkhorn on the transposed [K, B]
matrix without max-subtraction (`CustomModel.sinkhorn`), RCE and the rectification on NCHW maps
(`CustomModel.rce`, the `--proto_rectify` block of `step`), and the self-labelling block of
`step` over a batch, with the released shifting queues (newest rows at the top, shifted by the
row count per image, used only once the last row is non-zero). Arrays keep the dtype they are
given (float64 in the tests unless a float32 case is wanted).
"""

from __future__ import annotations

import numpy as np


def sinkhorn(out, prior, epsilon, iterations):
    """`CustomModel.sinkhorn`: [B, K] scores -> [B, K] assignments."""
    q = np.exp(out / epsilon).T.copy()  # [K, B]
    b = q.shape[1]
    q /= np.sum(q)
    for _ in range(iterations):
        q /= np.sum(q, axis=1, keepdims=True)
        q *= prior[:, None]
        q /= np.sum(q, axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def rce(pred_nchw, labels_nhw, ignore_index=250):
    """`CustomModel.rce` (labels copied first: the reference edits them in place)."""
    n_class = pred_nchw.shape[1]
    pred = np.clip(_softmax(pred_nchw, 1), 1e-7, 1.0)
    labels = np.array(labels_nhw, np.int64)
    mask = (labels != ignore_index).astype(pred.dtype)
    labels[labels == ignore_index] = n_class
    onehot = np.eye(n_class + 1, dtype=pred.dtype)[labels]  # [N, H, W, C + 1]
    onehot = np.clip(onehot.transpose(0, 3, 1, 2)[:, :-1], 1e-4, 1.0)
    return -(np.sum(pred * np.log(onehot), axis=1) * mask).sum() / (mask.sum() + 1e-6)


def cross_entropy(pred_nchw, labels_nhw, ignore_index=250):
    """`F.cross_entropy(ignore_index=...)`, mean over the kept pixels."""
    logp = _log_softmax(pred_nchw, 1)
    labels = np.asarray(labels_nhw)
    keep = labels != ignore_index
    n, h, w = np.nonzero(keep)
    return -logp[n, labels[keep], h, w].mean()


def rectify(weights_nchw, soft_nchw, train_thred, ignore_index=250):
    """The `--proto_rectify` block: int [N, 1, H, W] labels."""
    rectified = weights_nchw * soft_nchw
    arg = rectified.argmax(axis=1)[:, None]
    rectified = rectified / rectified.sum(axis=1, keepdims=True)
    top = rectified.max(axis=1, keepdims=True)
    arg[top < train_thred] = ignore_index
    return arg


def _normalize(x, axis):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def self_labelling_batch(
    feat_ds, out_ds, prototypes, queue, queue_out, prior, temperature, epsilon, iterations
):
    """The self-labelling block of `step` for a batch, after the random sampling.

    Args:
      feat_ds: [B, N, D] sampled EMA features (before normalisation).
      out_ds: [B, N, K] the EMA logits at the same pixels (before normalisation).
      prototypes: [K, D] the head W.
      queue: [L, D] feature queue, or None; updated in place as the reference does.
      queue_out: [L, K] logit queue, or None; updated in place.
      prior, temperature, epsilon, iterations: as released.

    Returns:
      loss_SL = mean over images of term 1 + mean over images of term 2.
    """
    feat_ds = _normalize(feat_ds, 2)
    out_ds = _normalize(out_ds, 2)
    fbs = feat_ds.shape[1]
    proto = _normalize(prototypes, 1)

    def term(out, q):
        return -np.mean(np.sum(q * _log_softmax(out / temperature, 1), axis=1))

    loss_sl = 0.0
    for i in range(feat_ds.shape[0]):
        out = feat_ds[i] @ proto.T
        out_ = out.copy()
        if queue is not None:
            if not np.all(queue[-1] == 0):
                out_ = np.concatenate([queue @ prototypes.T, out_])
            queue[fbs:] = queue[:-fbs].copy()
            queue[:fbs] = feat_ds[i]
        q = sinkhorn(out_, prior, epsilon, iterations)[-fbs:]
        loss_sl += term(out, q)
    loss_sl /= feat_ds.shape[0]

    loss_out = 0.0
    for i in range(out_ds.shape[0]):
        out = feat_ds[i] @ proto.T
        out_ = out_ds[i]
        if queue_out is not None:
            if not np.all(queue_out[-1] == 0):
                out_ = np.concatenate([queue_out, out_])
            queue_out[fbs:] = queue_out[:-fbs].copy()
            queue_out[:fbs] = out_ds[i]
        q = sinkhorn(out_, prior, epsilon, iterations)[-fbs:]
        loss_out += term(out, q)
    loss_out /= out_ds.shape[0]
    return loss_sl + loss_out


def consistency(teacher_warped_nchw, student_nchw, temperature, padding=250):
    """The `proto_consistW` block of `step` from the warped teacher scores on: the mask is
    `warped != padding` per (pixel, class) element, `F.kl_div(student, teacher, 'none')` is
    teacher * (log teacher - student), and the masked sum is divided by the mask's sum."""
    mask = (teacher_warped_nchw != padding).astype(student_nchw.dtype)
    teacher = _softmax(teacher_warped_nchw / temperature, 1)
    student = _log_softmax(student_nchw / temperature, 1)
    kl = teacher * (np.log(teacher) - student)
    return (kl * mask).sum() / mask.sum()


def prototypes_ema(prototypes_ema_, prototypes):
    """The EMA line after the SGD step of `step` (momentum hard-coded)."""
    return prototypes_ema_.copy() * 0.999 + prototypes.copy() * (1.0 - 0.999)


def contrastive(queue, queue_label, feats_, labels_, temperature):
    """`CustomModel.contrastive`: queue [L, D], queue_label [L, 1] (float, as the released queue),
    feats_ [N, D], labels_ [N, 1]."""
    mask = (labels_ == queue_label.T).astype(feats_.dtype)
    anchor_dot_contrast = (feats_ @ queue.T) / temperature
    logits = anchor_dot_contrast - anchor_dot_contrast.max(axis=1, keepdims=True)
    neg_mask = 1 - mask
    neg_logits = (np.exp(logits) * neg_mask).sum(1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits) + neg_logits)
    mean_log_prob_pos = (mask * log_prob).sum(1) / (mask.sum(1) + 1e-5)
    return (-mean_log_prob_pos).mean()


def calc_prototype(feat_nchw, pred_nhw, n_class, start=None):
    """`calc_prototype.py` on one loader pass: per image and class with >= 10 predicted pixels
    (`Class_Features.calculate_mean_vector`, a prediction given as labels), the image's mean
    feature, folded into `objective_vectors` by `update_objective_SingleVector(..., 'mean')`
    (running mean, count capped at 3000). `start` = (vectors [K, D], counts [K]) to continue.

    Returns:
      (objective_vectors [K, D], objective_vectors_num [K]).
    """
    n_img, dim = feat_nchw.shape[:2]
    if start is None:
        vectors, nums = np.zeros((n_class, dim)), np.zeros(n_class)
    else:
        vectors, nums = start[0].copy(), start[1].copy()
    hw = pred_nhw.shape[1] * pred_nhw.shape[2]
    for n in range(n_img):
        for t in range(n_class):
            pred_t = (pred_nhw[n] == t).astype(feat_nchw.dtype)
            scale_factor = pred_t.sum() / hw  # adaptive_avg_pool2d of the one-hot
            if scale_factor == 0 or (pred_t > 0).sum() < 10:
                continue
            vector = (feat_nchw[n] * pred_t).sum(axis=(1, 2)) / hw / scale_factor
            if vector.sum() == 0:
                continue
            vectors[t] = vectors[t] * nums[t] + vector
            nums[t] += 1
            vectors[t] = vectors[t] / nums[t]
            nums[t] = min(nums[t], 3000)
    return vectors, nums
