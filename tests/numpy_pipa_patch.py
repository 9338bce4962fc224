"""Test oracle: a direct numpy (float64) transcription of PiPa's released patch contrast
(`chen742/PiPa`), written for this project.

* `pair_city_boxes` follows `PiPa_DAFormer/dataloaders/city.py: PairCityDataset.__getitem__`
  from the first offset to `overlap*_ul/br`: the `while k < max_iters` loop with its snap to the
  stride, the overlap and IoU test, the fallback to identical crops and the `h // stride *
  stride` clip of `br`, with the `random.randint` draws given as arguments (x before y, as the
  loop draws them).
* `overlap_part`, `update_bank` and `patch_loss` follow the block of `PiPa_DAFormer/mmseg/models/
  uda/dacs.py: DACS.forward_train` from `# get overlap part` to `loss_unsup`: the per-image flip
  and `[ul // 8 : br // 8]` cut of NCHW features, concatenated over the batch; the list bank
  with its `step_count` / `step_save` trimming; the chunked negatives (chunks of 8000 rows, the
  shift taken over the positive and the first chunk only), the gate and the masked means.
"""

from __future__ import annotations

import numpy as np


def pair_city_boxes(h, w, crop_h, crop_w, stride, iou_bound, x1, y1, tries, max_iters=50):
    """tries: a sequence of (x2, y2) draws, at least as many as the loop consumes.

    Returns (x2, y2, k, ul1, br1, ul2, br2), ul/br as [y, x] lists in crop pixels.
    """
    k = 0
    x2 = y2 = None
    while k < max_iters:
        x2, y2 = tries[k]
        x2 = (x2 - x1) // stride * stride + x1
        y2 = (y2 - y1) // stride * stride + y1
        if x2 < 0:
            x2 += stride
        if y2 < 0:
            y2 += stride
        if (crop_w - abs(x2 - x1)) > 0 and (crop_h - abs(y2 - y1)) > 0:
            inter = (crop_w - abs(x2 - x1)) * (crop_h - abs(y2 - y1))
            union = 2 * crop_w * crop_h - inter
            iou = inter / union
            if iou >= iou_bound[0] and iou <= iou_bound[1]:
                break
        k += 1
    if k == max_iters:
        x2 = x1
        y2 = y1
    ul1 = [max(0, y2 - y1), max(0, x2 - x1)]
    br1 = [
        min(crop_h, crop_h + y2 - y1, h // stride * stride),
        min(crop_w, crop_w + x2 - x1, w // stride * stride),
    ]
    ul2 = [max(0, y1 - y2), max(0, x1 - x2)]
    br2 = [
        min(crop_h, crop_h + y1 - y2, h // stride * stride),
        min(crop_w, crop_w + x1 - x2, w // stride * stride),
    ]
    return x2, y2, k, ul1, br1, ul2, br2


def overlap_part(out1, out2, label1, label2, conf1, conf2, ul1, br1, ul2, br2, flip, stride=8):
    """out*: [B, C, h, w] (NCHW); label*, conf*: [B, h, w]; ul*/br*: [2, B] (y row, x row, as
    the collated lists); flip: [2, B].

    Returns (feat1 [n, C], feat2 [n, C], label1 [n], label2 [n], conf1 [n], conf2 [n]).
    """
    lists = [[] for _ in range(6)]
    for idx in range(out1.shape[0]):
        views = []
        for out, label, conf, ul, br, f in (
            (out1, label1, conf1, ul1, br1, flip[0]),
            (out2, label2, conf2, ul2, br2, flip[1]),
        ):
            o, y, c = out[idx], label[idx], conf[idx]
            if f[idx]:
                o, y, c = o[:, :, ::-1], y[:, ::-1], c[:, ::-1]
            r0, r1 = ul[0][idx] // stride, br[0][idx] // stride
            c0, c1 = ul[1][idx] // stride, br[1][idx] // stride
            views.append(
                (
                    o[:, r0:r1, c0:c1].transpose(1, 2, 0).reshape(-1, out.shape[1]),
                    y[r0:r1, c0:c1].reshape(-1),
                    c[r0:r1, c0:c1].reshape(-1),
                )
            )
        (f1, y1, c1), (f2, y2, c2) = views
        for lst, v in zip(lists, (f1, f2, y1, y2, c1, c2)):
            lst.append(v)
    return tuple(np.concatenate(lst, 0) for lst in lists)


def update_bank(feature_bank, label_bank, step_count, rows, labels, step_save=2):
    """The release's list bank: append, then drop the oldest once step_count > step_save.

    Returns (feature_bank, label_bank, step_count, all_feats, all_labels).
    """
    feature_bank = feature_bank + [rows]
    label_bank = label_bank + [labels]
    if step_count > step_save:
        feature_bank = feature_bank[1:]
        label_bank = label_bank[1:]
    else:
        step_count += 1
    return (
        feature_bank,
        label_bank,
        step_count,
        np.concatenate(feature_bank, 0),
        np.concatenate(label_bank, 0),
    )


def _one_side(pos, feat, bank, bank_labels, labels_overlap, temp, chunk):
    down = np.zeros(pos.shape[0])
    neg_max = None
    for i in range((bank.shape[0] - 1) // chunk + 1):
        lab = bank_labels[i * chunk : (i + 1) * chunk]
        rows = bank[i * chunk : (i + 1) * chunk]
        mask = (lab[None, :] != labels_overlap[:, None]).astype(np.float64)  # [n, b]
        neg = feat @ rows.T / temp  # [n, b]
        if i == 0:
            neg = np.concatenate([pos, neg], 1)  # [n, 1 + b]
            mask = np.concatenate([np.ones((mask.shape[0], 1)), mask], 1)
            neg_max = neg.max(1, keepdims=True)
        down += (np.exp(neg - neg_max) * mask).sum(-1)
    return np.exp(pos - neg_max)[:, 0], down


def patch_loss(
    feat1, feat2, label1, label2, conf1, conf2, bank, bank_labels, temp=0.1, pos_thresh=0.9,
    chunk=8000,
):  # fmt: skip
    """feat*: [n, C] paired overlap features; label*, conf*: [n]; bank [N, C], bank_labels [N].

    Returns (loss1, loss2); the release adds weight_unsup * (loss1 + loss2).
    """
    feat1, feat2, bank = (np.asarray(x, np.float64) for x in (feat1, feat2, bank))
    eps = 1e-8
    pos1 = (feat1 * feat2).sum(-1, keepdims=True) / temp  # [n, 1]
    pos2 = (feat1 * feat2).sum(-1, keepdims=True) / temp
    num1, down1 = _one_side(pos1, feat1, bank, bank_labels, label1, temp, chunk)
    logits1 = num1 / (down1 + eps)
    pos_mask_1 = ((conf2 > pos_thresh) & (conf1 < conf2)).astype(np.float64)
    loss1 = -np.log(logits1 + eps)
    loss1 = (loss1 * pos_mask_1).sum() / (pos_mask_1.sum() + 1e-12)
    num2, down2 = _one_side(pos2, feat2, bank, bank_labels, label2, temp, chunk)
    logits2 = num2 / (down2 + eps)
    pos_mask_2 = ((conf1 > pos_thresh) & (conf2 < conf1)).astype(np.float64)
    loss2 = -np.log(logits2 + eps)
    loss2 = (loss2 * pos_mask_2).sum() / (pos_mask_2.sum() + 1e-12)
    return loss1, loss2
