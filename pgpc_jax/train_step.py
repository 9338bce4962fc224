"""The DAFormer self-training step as one pure function (lhoyer/DAFormer `mmseg/models/uda/dacs.py`).

`train_step(state, src, tgt) -> (state, metrics)`, with src = {'image' [B,H,W,3] normalised,
'label' int [B,H,W]} and tgt = {'image'}, in DACS.forward_train's order:

  1. EMA teacher update from the current student (a copy at step 0), parameters only;
  2. source forward and cross-entropy; ImageNet feature distance on the source's thing classes;
  3. teacher forward on the target (BatchNorm on batch statistics, dropout and drop path off),
     pseudo-labels and DAFormer's quality weight (scalar per batch, top/bottom rows 0);
  4. ClassMix of source onto target, colour jitter and blur of the mixed images;
  5. mixed forward and weighted cross-entropy.

DAFormer backpropagates each loss separately and accumulates; one gradient of the sum is the
same. The student's BatchNorm runs twice (source, then mixed) and its running statistics are
updated twice, as in the reference. `uda.method='source_only'` keeps steps 2 only.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from pgpc_jax import optim
from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.train_state import TrainState
from pgpc_jax.uda import feature_distance as fd
from pgpc_jax.uda import mixing, teacher

METHODS = ("dacs", "source_only")


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
        k_src, k_mix_drop, k_classes, k_aug = jax.random.split(rng, 4)
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
            if dacs:
                mix_logits, _, stats = student(params, stats, mixed_img, k_mix_drop)
                losses["loss_mix"] = cross_entropy(mix_logits, mixed_lbl, mixed_w)
            return sum(losses.values()), (losses, stats)

        (loss, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
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
        )
        metrics.update({f"train/{k}": v for k, v in losses.items()})
        metrics["train/loss"] = loss
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/learning_rate"] = optim.learning_rate(state.step, **lr_kwargs)
        return new_state, metrics

    return train_step
