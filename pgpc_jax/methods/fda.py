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

from pgpc_jax.losses.entropy import robust_entropy
from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.uda import dacs, fourier, mixing

WINDOWS = fourier.WINDOWS


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


# Recipes of this method under their own names (`configs/<benchmark>.py:fda_sst`).
RECIPES = {"fda_sst": configure_self_training}


def validate(config) -> None:
    settings(config)


def needs_teacher(config) -> bool:
    return bool(config.fda.with_dacs)


def needs_imnet(config) -> bool:
    return dacs.needs_imnet(config)


def auxiliary_heads(config) -> dict:
    return {}


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
        return losses, ctx.method_state, metrics

    return losses
