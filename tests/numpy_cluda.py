"""Test oracle: a direct numpy (float64) transcription of CLUDA's released `contrastive_loss`
(`user0407/CLUDA`, `mmseg/models/losses/contrastive_loss.py`), written for this project.

It follows the reference step by step on NCHW-shaped inputs, including its flattening: the
features are split per pixel and stacked image by image inside each pixel
(`torch.cat(torch.unbind(feats, dim=1), dim=0)`, pixel-major), while labels and weights are
flattened with `view(-1, 1)` (batch-major). `intended_order=True` flattens the features
batch-major too, the pairing the code means.
"""

from __future__ import annotations

import numpy as np


def cluda_contrastive_loss(
    feats_nchw: np.ndarray,
    labels_b1hw: np.ndarray,
    pseudo_weight_b1hw: np.ndarray | None = None,
    temperature: float = 1.0,
    base_temperature: float = 1.0,
    intended_order: bool = False,
) -> float:
    """The released loss value for feats [B, C, h, w], labels [B, 1, h, w], weights [B, 1, h, w]."""
    f = np.asarray(feats_nchw, np.float64)
    b, c = f.shape[:2]
    f = f.transpose(0, 2, 3, 1).reshape(b, -1, c)  # [B, hw, C]
    # F.normalize(dim=-1): x / max(||x||, 1e-12).
    norm = np.sqrt(np.sum(f * f, axis=-1, keepdims=True))
    f = f / np.maximum(norm, 1e-12)
    labels = np.asarray(labels_b1hw).reshape(-1, 1)  # batch-major
    if intended_order:
        contrast = f.reshape(-1, c)
    else:
        # unbind over the pixel axis -> hw tensors [B, C]; cat over rows -> row p * B + b.
        contrast = np.concatenate([f[:, p, :] for p in range(f.shape[1])], axis=0)
    n = contrast.shape[0]

    mask = (labels == labels.T).astype(np.float64)
    dot = contrast @ contrast.T
    logits = dot - dot.max(axis=1, keepdims=True)
    neg_mask = 1.0 - mask
    mask = mask * (1.0 - np.eye(n))  # no self contrast
    neg_logits = (np.exp(logits) * neg_mask).sum(axis=1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits) + neg_logits)
    den = mask.sum(axis=1)
    den[den == 0] = 1
    if pseudo_weight_b1hw is not None:
        pw = np.asarray(pseudo_weight_b1hw, np.float64).reshape(-1, 1)
        log_prob = log_prob * (pw @ pw.T)
    mean_log_prob_pos = (mask * log_prob).sum(axis=1) / den
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return float(loss.mean())
