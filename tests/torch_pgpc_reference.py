"""Test oracle: the released PGPC contrast path written in PyTorch, for this project.

Two pieces, each following the released code operation by operation with torch's own ops (so
torch's `F.interpolate`, `F.normalize`, `torch.unbind`/`torch.cat` and autograd are the
reference, not our reading of them):

* `contrastive_loss`: CLUDA's `contrastive_loss` (`user0407/CLUDA`,
  `mmseg/models/losses/contrastive_loss.py`), the function PGPC's `dacs.py` calls. The only
  change is that the positive mask is built on the features' device instead of with `.cuda()`.
  `intended_order=True` flattens the features batch-major (the pairing the code means), which
  is the one-line difference to our `order_quirk=False`.
* `released_contrast_inputs`: the glue of PGPC's `dacs.py` around it: `transform_inputs`
  (each stage bilinearly resized with align_corners=False to stage 0's size, concatenated), the
  65x65 resize of the features (bilinear, align_corners=True), of the labels (legacy nearest, on
  the float labels, then `.long()`) and of the pixel weights (bilinear, align_corners=True).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def contrastive_loss(
    feats_: torch.Tensor,
    labels_: torch.Tensor,
    fdist_classes: Sequence[int] | None = None,
    pseudo_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    base_temperature: float = 1.0,
    intended_order: bool = False,
) -> torch.Tensor:
    """feats_ [B, C, h, w], labels_ [B, 1, h, w] long, pseudo_weight [B, 1, h, w] or None."""
    batch, channels = feats_.shape[:2]
    feats_ = feats_.permute(0, 2, 3, 1).reshape(batch, -1, channels)
    feats_ = F.normalize(feats_, dim=-1)
    labels_ = labels_.reshape(batch, -1, 1)
    labels = labels_.reshape(-1, 1)  # batch-major

    imnet_mask = None
    if fdist_classes is not None:
        thing = torch.any(labels_[..., None] == torch.tensor(fdist_classes), dim=-1)
        stuff = thing.logical_not().reshape(-1, 1)
        imnet_mask = (stuff == stuff.T).float()

    sim_weight = None
    if pseudo_weight is not None:
        pw = pseudo_weight.reshape(-1, 1)
        sim_weight = pw @ pw.T

    mask = (labels == labels.T).to(feats_.dtype).to(feats_.device)
    if intended_order:
        contrast_feature = feats_.reshape(-1, channels)
    else:
        # The released flattening: one [B, C] tensor per pixel, stacked pixel by pixel.
        contrast_feature = torch.cat(torch.unbind(feats_, dim=1), dim=0)

    anchor_dot_contrast = contrast_feature @ contrast_feature.T
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    neg_mask = 1 - mask
    self_mask = torch.eye(mask.shape[0], dtype=torch.bool).logical_not()
    mask = mask * self_mask
    neg_logits = (torch.exp(logits) * neg_mask).sum(1, keepdim=True)
    log_prob = logits - torch.log(torch.exp(logits) + neg_logits)
    if imnet_mask is not None:
        mask = mask * imnet_mask
    den = mask.sum(1)
    den[den == 0] = 1
    if sim_weight is not None:
        log_prob = log_prob * sim_weight
    mean_log_prob_pos = (mask * log_prob).sum(1) / den
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def transform_inputs(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The four stages [B, C_i, h_i, w_i] at stage 0's size, concatenated on channels."""
    size = feats[0].shape[2:]
    resized = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats]
    return torch.cat(resized, dim=1)


def released_contrast_inputs(
    feats: Sequence[torch.Tensor],
    labels: torch.Tensor,
    pseudo_weight: torch.Tensor | None = None,
    grid: Sequence[int] = (65, 65),
):
    """(features [B, C, gh, gw], labels [B, 1, gh, gw], weights [B, 1, gh, gw] or None) from the
    stage outputs, labels [B, 1, H, W] and pixel weights [B, H, W], as `dacs.py` builds them."""
    size = list(grid)
    fused = F.interpolate(transform_inputs(feats), size=size, mode="bilinear", align_corners=True)
    grid_labels = F.interpolate(labels.float(), size=size, mode="nearest").long()
    grid_weight = None
    if pseudo_weight is not None:
        grid_weight = F.interpolate(
            pseudo_weight.unsqueeze(1), size=size, mode="bilinear", align_corners=True
        )
    return fused, grid_labels, grid_weight


def _info_nce(anchor, positive, negatives, temperature):
    """-log(e^p / (e^p + sum_n e^n)) with p, n the anchor's similarities over the temperature."""
    p = anchor @ positive / temperature
    if not negatives:
        return p - p  # -log(e^p / e^p)
    n = torch.stack([anchor @ k / temperature for k in negatives])
    return -(p - torch.logsumexp(torch.cat([p[None], n]), dim=0))


def pgpc_loss_all_pixels(
    emb: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor,
    is_target: torch.Tensor,
    valid: torch.Tensor,
    ruled_in: torch.Tensor,
    proto_mean: torch.Tensor,
    proto_seen: torch.Tensor,
    *,
    temperature: float,
    reliable_threshold: float,
    prototype_momentum: float,
    source_anchors: bool,
    positives: str,
    unreliable_negatives: bool,
    ignore_index: int = 255,
):
    """The default loss of `docs/pgpc_spec.md` (this project's reconstruction: there is no released
    code) with every eligible pixel taken as anchor and negative, written anchor by anchor with
    dynamic indexing, independently of `pgpc_jax.losses.contrast`.

    Returns (loss, new prototype means, new seen flags).
    """
    num_classes = proto_mean.shape[0]
    z = F.normalize(emb, dim=-1)
    known = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    reliable = valid & known & (confidence >= reliable_threshold)
    unreliable = valid & is_target & (confidence < reliable_threshold)

    # Prototypes: EMA of the class means of the reliable embeddings (no gradient).
    new_mean, new_seen = proto_mean.clone(), proto_seen.clone()
    for c in range(num_classes):
        members = reliable & (labels == c)
        if members.any():
            batch_mean = z.detach()[members].mean(0)
            if proto_seen[c]:
                old = proto_mean[c]
                batch_mean = prototype_momentum * old + (1 - prototype_momentum) * batch_mean
            new_mean[c], new_seen[c] = batch_mean, True
    proto_hat = F.normalize(new_mean, dim=-1)

    terms = []
    for a in torch.nonzero(reliable & (is_target | source_anchors)).flatten().tolist():
        y = int(labels[a])
        if not new_seen[y]:
            continue
        negatives = [z[k] for k in range(len(z)) if reliable[k] and labels[k] != y]
        if unreliable_negatives:
            negatives += [
                z[k] for k in range(len(z)) if unreliable[k] and not (ruled_in[k] == y).any()
            ]
        if positives == "prototype":
            terms.append(_info_nce(z[a], proto_hat[y], negatives, temperature))
        else:
            pos = [k for k in range(len(z)) if reliable[k] and labels[k] == y and k != a]
            if pos:
                terms.append(
                    torch.stack([_info_nce(z[a], z[k], negatives, temperature) for k in pos]).mean()
                )
    loss = torch.stack(terms).mean() if terms else emb.sum() * 0.0
    return loss, new_mean, new_seen
