"""The DAFormer self-training step as one pure function (lhoyer/DAFormer `mmseg/models/uda/dacs.py`).

`train_step(state, src, tgt) -> (state, metrics)`, with src = {'image' [B,H,W,3] normalised,
'label' int [B,H,W]} and tgt = {'image'}, in DACS.forward_train's order:

  1. EMA teacher update from the current student (a copy at step 0), parameters only;
  2. source forward and cross-entropy; ImageNet feature distance on the source's thing classes;
  3. teacher forward on the target (BatchNorm on batch statistics, dropout and drop path off),
     pseudo-labels and DAFormer's quality weight (scalar per batch, top/bottom rows 0);
  4. ClassMix of source onto target, colour jitter and blur of the mixed images;
  5. mixed forward and weighted cross-entropy;
  6. optionally a pixel-contrast loss on the encoder features of the source and mixed images
     (`contrast.variant`: 'pgpc', 'cluda' or 'none'; `losses/contrast.py`).

DAFormer backpropagates each loss separately and accumulates; one gradient of the sum is the
same. The student's BatchNorm runs twice (source, then mixed) and its running statistics are
updated twice, as in the reference. `uda.method='source_only'` keeps step 2 only.

The contrast (PGPC's released `dacs.py`): the four encoder stages of each forward are fused at
stride 4 and sampled on a `contrast.grid` (65x65 for 512 crops, align_corners=True); labels go
to the grid by PyTorch's legacy nearest rule. 'cluda' is the released lineage's loss on the
source grid (ground truth) plus the mixed grid (mixed labels, bilinear pixel weights), weight 1
each. 'pgpc' is this project's reconstruction (`pgpc_spec.md`): one pixel set of the source and
mixed grids of the global batch, each pixel with its label, confidence (1 for source and pasted
pixels, the teacher's max probability for target ones, taken at the label's pixel), and the
teacher's top-K classes; class prototypes live in `state.prototypes`. No parameter is added.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from pgpc_jax import optim
from pgpc_jax.losses import contrast as cl
from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.train_state import TrainState
from pgpc_jax.uda import feature_distance as fd
from pgpc_jax.uda import mixing, teacher

METHODS = ("dacs", "source_only")
CONTRAST_VARIANTS = ("none", "pgpc", "cluda")


def contrast_settings(config) -> dict:
    """The contrast group as plain Python values, validated."""
    c = config.contrast
    if c.variant not in CONTRAST_VARIANTS:
        raise ValueError(f"contrast.variant={c.variant!r}: expected one of {CONTRAST_VARIANTS}")
    if c.variant != "none" and config.uda.method != "dacs":
        raise ValueError(
            f"contrast.variant={c.variant!r} needs uda.method='dacs' (it contrasts the mixed "
            f"images' pseudo-labels), got uda.method={config.uda.method!r}"
        )
    if c.label_grid not in ("nearest", "majority"):
        raise ValueError(f"contrast.label_grid={c.label_grid!r}: expected 'nearest' or 'majority'")
    if c.positives not in ("prototype", "pixel"):
        raise ValueError(f"contrast.positives={c.positives!r}: expected 'prototype' or 'pixel'")
    return dict(
        variant=c.variant,
        weight=float(c.weight),
        start_step=int(c.start_step),
        grid=tuple(int(g) for g in c.grid),
        quirk=bool(c.cluda_order_quirk),
        label_grid=str(c.label_grid),
        topk=int(c.unreliable_topk),
        pgpc=dict(
            num_classes=int(config.model.num_classes),
            temperature=float(c.temperature),
            reliable_threshold=float(c.reliable_threshold),
            prototype_momentum=float(c.prototype_momentum),
            num_anchors=int(c.num_anchors),
            num_negatives=int(c.num_negatives),
            num_unreliable=int(c.num_unreliable),
            source_anchors=bool(c.source_anchors),
            positives=str(c.positives),
            unreliable_negatives=bool(c.unreliable_negatives),
        ),
    )


def _grid_pixels(emb: jax.Array) -> jax.Array:
    return emb.reshape(-1, emb.shape[-1])


def make_train_step(config, model, tx: optax.GradientTransformation) -> Callable:
    """Close over plain hyperparameters (never the ConfigDict) and return the pure step."""
    uda = config.uda
    if uda.method not in METHODS:
        raise ValueError(f"uda.method={uda.method!r}: expected one of {METHODS}")
    dacs = uda.method == "dacs"
    num_classes = config.model.num_classes
    fd_lambda = float(uda.fd_lambda)
    fd_classes = tuple(uda.fd_classes)
    fd_min_ratio = float(uda.fd_min_ratio)
    ema_alpha = float(uda.ema_alpha)
    threshold = float(uda.pseudo_threshold)
    per_pixel = {"scalar": False, "pixel": True}[uda.pseudo_weight]
    ignore_top, ignore_bottom = int(uda.pseudo_ignore_top), int(uda.pseudo_ignore_bottom)
    target_weight = float(uda.target_weight)
    contrast = contrast_settings(config)
    variant, grid = contrast["variant"], contrast["grid"]
    if contrast["label_grid"] == "majority":

        def labels_to_grid(labels, grid):
            return cl.majority_labels_to_grid(labels, grid, num_classes=num_classes)
    else:
        labels_to_grid = cl.labels_to_grid
    jitter = dict(
        jitter_strength=float(uda.color_jitter_strength),
        jitter_prob=float(uda.color_jitter_prob),
        blur_prob=float(uda.blur_prob),
    )
    opt = dict(config.optimizer)
    lr_kwargs = dict(
        base_lr=opt["learning_rate"],
        num_steps=config.num_train_steps,
        warmup_steps=opt["warmup_steps"],
        warmup_ratio=opt["warmup_ratio"],
        power=opt["poly_power"],
        min_lr=opt["min_lr"],
    )

    def student(params, batch_stats, images, rng):
        (logits, feats), updated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return logits, feats, updated["batch_stats"]

    def train_step(state: TrainState, src: dict, tgt: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        k_src, k_mix_drop, k_classes, k_aug, k_contrast = jax.random.split(rng, 5)
        metrics = {}

        if dacs:
            teacher_params = teacher.update_teacher(
                state.teacher_params, state.params, state.step, ema_alpha
            )
            # Teacher: train-mode BatchNorm on the target batch (its running statistics are
            # never used, so the update is dropped), no dropout; logits at the image size.
            (t_logits, _), _ = model.apply(
                {"params": teacher_params, "batch_stats": state.batch_stats},
                tgt["image"],
                train=True,
                dropout=False,
                mutable=["batch_stats"],
            )
            t_logits = resize_bilinear(jax.lax.stop_gradient(t_logits), tgt["image"].shape[1:3])
            p_labels, p_weight, p_stats = teacher.pseudo_labels(
                t_logits, threshold, ignore_top, ignore_bottom, per_pixel
            )
            p_weight = p_weight * target_weight
            mask = mixing.class_mix_masks(k_classes, src["label"], num_classes)
            mixed_img, mixed_lbl, mixed_w = mixing.class_mix(
                mask, src["image"], tgt["image"], src["label"], p_labels, p_weight
            )
            if variant == "pgpc":
                # Per-pixel facts of the mixed images for the contrast, taken to the grid at the
                # same pixels as the labels (nearest): confidence (1 where source is pasted),
                # origin, the teacher's top-K classes, and whether the row is used at all.
                t_probs = jax.nn.softmax(t_logits.astype(jnp.float32), axis=-1)
                pasted = mask > 0.5
                mix_conf = jnp.where(pasted, 1.0, jnp.max(t_probs, axis=-1))
                ruled_in = jax.lax.top_k(t_probs, contrast["topk"])[1]
                rows = teacher.kept_rows(t_probs.shape[1], ignore_top, ignore_bottom)
                mix_use = pasted | rows[None, :, None]
                mix_grid = dict(
                    label=labels_to_grid(mixed_lbl, grid),
                    confidence=cl.labels_to_grid(mix_conf, grid),
                    is_target=~cl.labels_to_grid(pasted, grid),
                    valid=cl.labels_to_grid(mix_use, grid),
                    ruled_in=cl.labels_to_grid(ruled_in, grid),
                )
            mixed_img, applied = mixing.strong_augment(k_aug, mixed_img, **jitter)
            metrics.update(
                {
                    "train/pseudo_confidence": p_stats["confidence"],
                    "train/pseudo_coverage": p_stats["coverage"],
                    "train/jitter": applied["jitter"],
                    "train/blur": applied["blur"],
                }
            )
        else:
            teacher_params = state.teacher_params

        def loss_fn(params):
            logits, feats, stats = student(params, state.batch_stats, src["image"], k_src)
            losses = {"loss_src": cross_entropy(logits, src["label"])}
            if fd_lambda > 0:
                imnet_feats = model.apply(
                    {"params": {"backbone": state.imnet_params}},
                    src["image"],
                    method=lambda m, x: m.encode(x, train=False),
                )
                losses["loss_fd"] = fd_lambda * fd.feature_distance(
                    feats[-1],
                    jax.lax.stop_gradient(imnet_feats[-1]),
                    src["label"],
                    fd_classes,
                    fd_min_ratio,
                    num_classes,
                )
            aux = {}
            if dacs:
                mix_logits, mix_feats, stats = student(params, stats, mixed_img, k_mix_drop)
                losses["loss_mix"] = cross_entropy(mix_logits, mixed_lbl, mixed_w)
                if variant != "none":
                    on = (state.step >= contrast["start_step"]).astype(jnp.float32)
                    scale = contrast["weight"] * on
                    src_emb = cl.embed_features(feats, grid)
                    mix_emb = cl.embed_features(mix_feats, grid)
                    src_lbl = labels_to_grid(src["label"], grid)
                    if variant == "cluda":
                        q = contrast["quirk"]
                        losses["loss_contrast_src"] = scale * cl.cluda_loss(
                            src_emb, src_lbl, order_quirk=q
                        )
                        losses["loss_contrast_mix"] = scale * cl.cluda_loss(
                            mix_emb,
                            labels_to_grid(mixed_lbl, grid),
                            cl.values_to_grid(mixed_w, grid),
                            order_quirk=q,
                        )
                    else:
                        g = mix_grid
                        n_src = src_lbl.size
                        ones = jnp.ones((n_src,), bool)
                        loss_c, aux["prototypes"], aux["stats"] = cl.pgpc_loss(
                            k_contrast,
                            jnp.concatenate([_grid_pixels(src_emb), _grid_pixels(mix_emb)]),
                            jnp.concatenate([src_lbl.reshape(-1), g["label"].reshape(-1)]),
                            jnp.concatenate([jnp.ones((n_src,)), g["confidence"].reshape(-1)]),
                            jnp.concatenate([~ones, g["is_target"].reshape(-1)]),
                            jnp.concatenate([ones, g["valid"].reshape(-1)]),
                            jnp.concatenate(
                                [
                                    jnp.zeros((n_src, contrast["topk"]), jnp.int32),
                                    g["ruled_in"].reshape(-1, contrast["topk"]),
                                ]
                            ),
                            state.prototypes,
                            **contrast["pgpc"],
                        )
                        losses["loss_contrast"] = scale * loss_c
            return sum(losses.values()), (losses, stats, aux)

        (loss, (losses, batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            teacher_params=teacher_params,
            prototypes=aux.get("prototypes", state.prototypes),
        )
        metrics.update({f"train/{k}": v for k, v in losses.items()})
        metrics.update({f"train/{k}": v for k, v in aux.get("stats", {}).items()})
        metrics["train/loss"] = loss
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/learning_rate"] = optim.learning_rate(state.step, **lr_kwargs)
        return new_state, metrics

    return train_step
