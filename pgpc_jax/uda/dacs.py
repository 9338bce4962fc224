"""DACS's training step in pieces that methods compose (lhoyer/DAFormer `mmseg/models/uda/dacs.py`,
`forward_train`): the source loss with the ImageNet feature distance, the teacher's
pseudo-labels, and ClassMix of source onto target with the strong augmentation.

The pieces take bound forward functions (`student(images, rng) -> outputs`,
`teacher(images) -> outputs`, `imnet(images) -> encoder features`; outputs as
`Segmentor.__call__`) and plain settings from `settings(config)`, so every method calls the same
code. The PRNG keys of one step are `split_keys(rng)`: one key per random use, in a fixed order,
so that a method that adds a loss draws from `keys.method` and changes no other draw.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.uda import feature_distance as fd
from pgpc_jax.uda import mixing, teacher

Forward = Callable[..., dict[str, Any]]


class Keys(NamedTuple):
    """The PRNG keys of one step: dropout of the source forward, dropout of the mixed forward,
    ClassMix's classes, the strong augmentation, and one for the method's own draws."""

    source: jax.Array
    mix_dropout: jax.Array
    classes: jax.Array
    augment: jax.Array
    method: jax.Array


def split_keys(rng: jax.Array) -> Keys:
    """The step's keys from `fold_in(state.rng, step)`."""
    return Keys(*jax.random.split(rng, 5))


def settings(config) -> dict[str, Any]:
    """The `uda` group (and the class count) as plain Python values."""
    uda = config.uda
    return dict(
        num_classes=int(config.model.num_classes),
        fd_lambda=float(uda.fd_lambda),
        fd_classes=tuple(uda.fd_classes),
        fd_min_ratio=float(uda.fd_min_ratio),
        threshold=float(uda.pseudo_threshold),
        per_pixel={"scalar": False, "pixel": True}[uda.pseudo_weight],
        ignore_top=int(uda.pseudo_ignore_top),
        ignore_bottom=int(uda.pseudo_ignore_bottom),
        target_weight=float(uda.target_weight),
        jitter=dict(
            jitter_strength=float(uda.color_jitter_strength),
            jitter_prob=float(uda.color_jitter_prob),
            blur_prob=float(uda.blur_prob),
        ),
    )


def source_losses(
    student: Forward, imnet: Forward | None, src: dict, key: jax.Array, s: dict
) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Source cross-entropy and, when `fd_lambda` > 0, the ImageNet feature distance on the
    source's thing classes (DAFormer `calc_feat_dist` on the last encoder stage).

    Returns:
      ({'loss_src'[, 'loss_fd']}, the student's source outputs).
    """
    out = student(src["image"], key)
    losses = {"loss_src": cross_entropy(out["logits"], src["label"])}
    if s["fd_lambda"] > 0:
        imnet_features = imnet(src["image"])
        losses["loss_fd"] = s["fd_lambda"] * fd.feature_distance(
            out["features"][-1],
            imnet_features[-1],
            src["label"],
            s["fd_classes"],
            s["fd_min_ratio"],
            s["num_classes"],
        )
    return losses, out


def pseudo_label(teacher_fwd: Forward, images: jax.Array, s: dict) -> dict[str, jax.Array]:
    """The teacher's pseudo-labels of the target images, with DAFormer's quality weight times
    `target_weight` (PGPC's lambda_t).

    Returns:
      {'logits': float32 [B, H, W, K] at the image size, 'label': int32 [B, H, W],
       'weight': float32 [B, H, W], 'confidence', 'coverage': scalars}.
    """
    logits = resize_bilinear(teacher_fwd(images)["logits"], images.shape[1:3])
    labels, weight, stats = teacher.pseudo_labels(
        logits, s["threshold"], s["ignore_top"], s["ignore_bottom"], s["per_pixel"]
    )
    return dict(logits=logits, label=labels, weight=weight * s["target_weight"], **stats)


def class_mix(
    keys: Keys, src: dict, tgt_images: jax.Array, pseudo: dict, s: dict
) -> dict[str, jax.Array]:
    """ClassMix of the source onto the target, then colour jitter and blur of the mixed images.

    Returns:
      {'mask': float [B, H, W] (1 where source is pasted), 'image' [B, H, W, 3] (augmented),
       'label' int32 and 'weight' float32 [B, H, W], 'jitter', 'blur': 0/1 scalars}.
    """
    mask = mixing.class_mix_masks(keys.classes, src["label"], s["num_classes"])
    images, labels, weight = mixing.class_mix(
        mask, src["image"], tgt_images, src["label"], pseudo["label"], pseudo["weight"]
    )
    images, applied = mixing.strong_augment(keys.augment, images, **s["jitter"])
    return dict(mask=mask, image=images, label=labels, weight=weight, **applied)


def self_training(ctx, s: dict, keys: Keys) -> dict[str, Any]:
    """One DACS step's losses: source CE (+ feature distance), then the mixed images' weighted
    CE with the teacher's pseudo-labels. `ctx` is a `methods.Context` (student, teacher, imnet,
    src, tgt).

    Returns:
      {'losses': {'loss_src'[, 'loss_fd'], 'loss_mix'}, 'metrics': pseudo-label and
       augmentation statistics, 'source' / 'mixed': the student's outputs, 'pseudo': as
       `pseudo_label`, 'mix': as `class_mix`}.
    """
    pseudo = pseudo_label(ctx.teacher, ctx.tgt["image"], s)
    mix = class_mix(keys, ctx.src, ctx.tgt["image"], pseudo, s)
    losses, source = source_losses(ctx.student, ctx.imnet, ctx.src, keys.source, s)
    mixed = ctx.student(mix["image"], keys.mix_dropout)
    losses["loss_mix"] = cross_entropy(mixed["logits"], mix["label"], mix["weight"])
    metrics = {
        "pseudo_confidence": pseudo["confidence"],
        "pseudo_coverage": pseudo["coverage"],
        "jitter": mix["jitter"],
        "blur": mix["blur"],
    }
    return dict(losses=losses, metrics=metrics, source=source, mixed=mixed, pseudo=pseudo, mix=mix)


def needs_imnet(config) -> bool:
    """The frozen ImageNet encoder is kept only when the feature distance is on."""
    return float(config.uda.fd_lambda) > 0
