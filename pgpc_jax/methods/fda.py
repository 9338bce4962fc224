"""FDA: Fourier Domain Adaptation (Yang & Soatto, CVPR 2020; YanchaoYang/FDA `train.py`,
`SStrain.py`) on the DAFormer segmentor, and FDA's styling inside DAFormer self-training.

One step, in the released order:

1. each source image takes the low-frequency amplitude of the target image of the same batch
   position (`uda/fourier.py`, on raw [0, 255] pixels, window `fda.window`, size `fda.beta`);
   the target batch is fresh every step, as the released step's next target image;
2. the cross-entropy of the student on the styled source (and the ImageNet feature distance,
   when `uda.fd_lambda` > 0);
3. the student on the target: the robust entropy of its logits at their own resolution
   (`losses/entropy.py`), weighted by `fda.entropy_weight` from step `fda.entropy_start_step`
   on; with `fda.self_training` (FDA's self-training rounds, `SStrain.py`, the `fda_sst`
   recipe) the target batch carries pseudo-labels and their cross-entropy is added, the entropy
   on from step 0 as released.

`fda.with_dacs=True` runs DAFormer self-training (`uda/dacs.py`: teacher pseudo-labels, ClassMix,
strong augmentation) with the styled source in place of the source, in the source loss and in
the mix; the entropy term is added when `fda.entropy_weight` > 0 (an extra student forward of
the target).

Deviations from the reference, each a config field or a row of `docs/method.md`: the model is
DAFormer's (MiT + DAFormer head, its cross-entropy at the label size, align_corners=False)
instead of DeepLab-v2; images are normalised with the ImageNet mean and std after the swap
(the reference subtracts its BGR mean only); the entropy is divided by log C (`fda.entropy_normalizer`
= 2.9444 gives the released constant); the released `switch2entropy` = s turns the entropy on
for steps > s, i.e. `fda.entropy_start_step` = s + 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from data_pipelines.labels import IGNORE_INDEX
from pgpc_jax.losses.contrast import sample_class_balanced
from pgpc_jax.losses.entropy import robust_entropy
from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.losses.supcon import paired_supcon
from pgpc_jax.models.heads import ProjectionHead
from pgpc_jax.models.layers import resize_nearest_legacy
from pgpc_jax.models.segmentor import DTYPES
from pgpc_jax.uda import dacs, fourier, mixing

WINDOWS = fourier.WINDOWS
HEAD = "projection"  # the contrast's auxiliary head: params `auxiliary_head/projection`


def config_group() -> ml_collections.ConfigDict:
    """The `fda` group. [released] = YanchaoYang/FDA's `train.py` / `SStrain.py` and their
    options; [ours] = a choice of this project."""
    return ml_collections.ConfigDict(
        dict(
            # The window size L: b = floor(min(H, W) * beta) [released --LB; the paper's three
            # models: 0.01, 0.05, 0.09].
            beta=0.01,
            # 'numpy' (centred (2b+1)^2 block, FDA_source_to_target_np) or 'torch' (the corner
            # blocks of FDA_source_to_target, what train.py uses) [released, both].
            window="numpy",
            # Robust entropy on the target [released: --entW 0.005, --ita 2.0].
            entropy_weight=0.005,
            eta=2.0,
            # First step of the entropy term [released: on for steps > --switch2entropy, 0 in
            # the README command and the paper, i.e. from step 1; 50000 as argparse default].
            entropy_start_step=0,
            # What the entropy is divided by: 0 for log C [ours], 2.9444 as released.
            entropy_normalizer=0.0,
            # FDA's self-training rounds (SStrain.py): the target carries pseudo-labels
            # (`python -m pgpc_jax.pseudo_label`) and their cross-entropy is added [released].
            self_training=False,
            # FDA's styling of the source inside DAFormer self-training [ours].
            with_dacs=False,
            # The supervised pixel contrast between each pseudo-labelled target image and its
            # source-styled version (the `fda_supcon` recipe) [reconstructed, all fields]:
            # weight (0: off), temperature, pixels sampled per image (class-balanced, the same
            # positions in both views), both directions averaged, the projection head's width.
            contrast_weight=0.0,
            contrast_temperature=0.1,
            contrast_samples=1024,
            contrast_symmetric=True,
            contrast_channels=256,
        )
    )


def configure(config) -> None:
    """FDA on a DAFormer config: the `fda` group; no feature distance (FDA has none)."""
    config.fda = config_group()
    config.uda.fd_lambda = 0.0


def configure_self_training(config) -> None:
    """The `fda_sst` recipe: FDA's self-training round (`SStrain.py`): the target loss is the
    cross-entropy with the pseudo-labels of `data.target` (a folder build of the pseudo-label
    command's output) plus the entropy from step 0."""
    configure(config)
    config.fda.self_training = True
    config.fda.entropy_start_step = 0


def configure_supcon(config) -> None:
    """The `fda_supcon` recipe [reconstructed]: FDA (styled-source CE, target entropy) plus the
    supervised pixel contrast between each target image of `data.target` (a pseudo-label build,
    stage 1: `python -m pgpc_jax.pseudo_label` with FDA models on target images styled to the
    source) and its source-styled version; the pseudo-labels enter only the contrast."""
    configure(config)
    config.fda.contrast_weight = 1.0


# Recipes of this method under their own names (`configs/<benchmark>.py:fda_sst`).
RECIPES = {"fda_sst": configure_self_training, "fda_supcon": configure_supcon}


def target_labels(config) -> bool:
    """Does the run read pseudo-labels from its target dataset (the trainer opens the target
    split's labels)?"""
    return bool(config.fda.self_training) or float(config.fda.contrast_weight) > 0


def validate(config) -> None:
    settings(config)


def needs_teacher(config) -> bool:
    return bool(config.fda.with_dacs)


def needs_imnet(config) -> bool:
    return dacs.needs_imnet(config)


def auxiliary_heads(config) -> dict:
    """SePiCo's projection head, for the contrast."""
    if float(config.fda.contrast_weight) <= 0:
        return {}
    return {
        HEAD: ProjectionHead(
            channels=int(config.fda.contrast_channels), dtype=DTYPES[config.model.dtype]
        )
    }


def init_state(config, params) -> None:
    return None


def settings(config) -> dict[str, Any]:
    """The `fda` group as plain Python values, validated."""
    c = config.fda
    if c.window not in WINDOWS:
        raise ValueError(f"fda.window={c.window!r}: expected one of {WINDOWS}")
    beta = float(c.beta)
    if not 0.0 <= beta <= 0.5:
        raise ValueError(f"fda.beta={c.beta!r}: expected a value in [0, 0.5] (FDA uses 0.01-0.09)")
    for key in ("entropy_weight", "eta", "entropy_normalizer"):
        if not float(c[key]) >= 0:
            raise ValueError(f"fda.{key}={c[key]!r}: expected a number >= 0")
    if int(c.entropy_start_step) < 0:
        raise ValueError(f"fda.entropy_start_step={c.entropy_start_step!r}: expected >= 0")
    contrast = float(c.contrast_weight)
    if not contrast >= 0 or not float(c.contrast_temperature) > 0:
        raise ValueError(
            f"fda.contrast_weight={c.contrast_weight!r}, fda.contrast_temperature="
            f"{c.contrast_temperature!r}: expected a weight >= 0 and a temperature > 0"
        )
    for key in ("contrast_samples", "contrast_channels"):
        if int(c[key]) < 1:
            raise ValueError(f"fda.{key}={c[key]!r}: expected an integer >= 1")
    if contrast > 0 and c.with_dacs:
        raise ValueError(
            "fda.contrast_weight > 0 with fda.with_dacs=True: the contrast reads the pseudo-label "
            "dataset's labels; use it without DACS"
        )
    if c.self_training and c.with_dacs:
        raise ValueError(
            "fda.self_training=True and fda.with_dacs=True: choose one target loss (the "
            "pseudo-label dataset's labels or the teacher's)"
        )
    source, target = tuple(config.data.source.crop_size), tuple(config.data.target.crop_size)
    if source != target:
        raise ValueError(
            f"FDA swaps amplitudes between equal-size images: data.source.crop_size={source} but "
            f"data.target.crop_size={target}; set them equal"
        )
    normalizer = float(c.entropy_normalizer)
    return dict(
        beta=beta,
        window=str(c.window),
        entropy_weight=float(c.entropy_weight),
        eta=float(c.eta),
        entropy_start_step=int(c.entropy_start_step),
        normalizer=normalizer if normalizer > 0 else None,
        self_training=bool(c.self_training),
        with_dacs=bool(c.with_dacs),
        num_classes=int(config.model.num_classes),
        contrast=dict(
            weight=contrast,
            temperature=float(c.contrast_temperature),
            samples=int(c.contrast_samples),
            symmetric=bool(c.contrast_symmetric),
        ),
    )


def style_to(images: jax.Array, style: jax.Array, beta: float, window: str) -> jax.Array:
    """Normalised images given the low-frequency amplitude of `style` (normalised, same shape
    [B, H, W, 3], paired by position): the swap runs on [0, 255] pixels, not clipped, and the
    result is normalised again."""
    raw = mixing.denormalize(images) * 255.0
    raw_style = mixing.denormalize(style) * 255.0
    return mixing.renormalize(fourier.fda_source_to_target(raw, raw_style, beta, window) / 255.0)


def paired_targets(target_images: jax.Array, num_sources: int) -> jax.Array:
    """The target image of each source image: the same batch position (cycled when the target
    batch is smaller)."""
    return fourier.pick_targets(
        target_images, num_sources, indices=jnp.arange(num_sources) % target_images.shape[0]
    )


def entropy_term(logits: jax.Array, step: jax.Array, f: dict) -> tuple[jax.Array, jax.Array]:
    """(the weighted robust entropy switched on from `entropy_start_step`, the unweighted
    value)."""
    value = robust_entropy(logits, f["eta"], normalizer=f["normalizer"])
    on = (step >= f["entropy_start_step"]).astype(value.dtype)
    return f["entropy_weight"] * on * value, value


def contrast_term(
    key: jax.Array, view_a: jax.Array, view_b: jax.Array, labels: jax.Array, f: dict
) -> tuple[jax.Array, jax.Array]:
    """The supervised contrast of two aligned projections [B, h, w, D] with full-size
    pseudo-labels [B, H, W]: per image a class-balanced sample of its labelled pixels (the same
    positions in both views), pooled over the batch.

    Returns:
      (the weighted loss, the share of valid sample slots).
    """
    b, h, w, d = view_a.shape
    c = f["contrast"]
    grid = resize_nearest_legacy(labels, (h, w)).reshape(b, h * w)
    eligible = (grid != IGNORE_INDEX) & (grid >= 0) & (grid < f["num_classes"])
    sample = jax.vmap(
        lambda k, y, e: sample_class_balanced(k, y, e, c["samples"], f["num_classes"])
    )
    index, valid = sample(jax.random.split(key, b), grid, eligible)
    take = lambda x: jnp.take_along_axis(x, index, axis=1)  # noqa: E731
    rows = lambda v: jnp.take_along_axis(v.reshape(b, h * w, d), index[..., None], axis=1)  # noqa: E731
    loss = paired_supcon(
        rows(view_a).reshape(-1, d),
        rows(view_b).reshape(-1, d),
        take(grid).reshape(-1),
        valid.reshape(-1),
        c["temperature"],
        c["symmetric"],
    )
    return c["weight"] * loss, jnp.mean(valid.astype(jnp.float32))


def make_losses(config):
    s = dacs.settings(config)
    f = settings(config)

    def losses(ctx):
        keys = dacs.split_keys(ctx.rng)
        src_images = ctx.src["image"]
        styled = style_to(
            src_images,
            paired_targets(ctx.tgt["image"], src_images.shape[0]),
            f["beta"],
            f["window"],
        )
        src = {**ctx.src, "image": styled}
        metrics = {}
        if f["with_dacs"]:
            out = dacs.self_training(dataclasses.replace(ctx, src=src), s, keys)
            losses, metrics = out["losses"], out["metrics"]
            if f["entropy_weight"] > 0:
                target = ctx.student(ctx.tgt["image"], keys.method)
                losses["loss_ent"], metrics["entropy"] = entropy_term(target["logits"], ctx.step, f)
            return losses, ctx.method_state, metrics
        losses, _ = dacs.source_losses(ctx.student, ctx.imnet, src, keys.source, s)
        target = ctx.student(ctx.tgt["image"], keys.mix_dropout)
        if f["self_training"]:
            losses["loss_tgt"] = cross_entropy(target["logits"], ctx.tgt["label"])
        losses["loss_ent"], metrics["entropy"] = entropy_term(target["logits"], ctx.step, f)
        if f["contrast"]["weight"] > 0:
            # The target in the source's style: each target image takes the low-frequency
            # amplitude of the (raw) source image of its batch position.
            tgt_images = ctx.tgt["image"]
            in_source_style = style_to(
                tgt_images, paired_targets(src_images, tgt_images.shape[0]), f["beta"], f["window"]
            )
            k_styled, k_sample = jax.random.split(keys.method)
            styled_view = ctx.student.auxiliary(in_source_style, k_styled)[HEAD]
            losses["loss_contrast"], metrics["contrast_samples"] = contrast_term(
                k_sample, target[HEAD], styled_view, ctx.tgt["label"], f
            )
        return losses, ctx.method_state, metrics

    return losses
