"""SePiCo: DAFormer self-training plus semantic-guided pixel contrast on a projection head
(BIT-DA/SePiCo `mmseg/models/uda/sepico.py`, `SePiCo.forward_train`; `docs/method.md`, "SePiCo").

One step, in the released order (the EMA teacher update is done first by the generic step):

1. the teacher's pseudo-labels of the weak, un-cropped target image; with
   `sepico.class_balanced_crop` the class-balanced crop (`uda/class_balanced_crop.py`) of the size
   of the source crop is chosen on them, the target is cropped and, with `sepico.regen_pseudo`,
   the teacher labels the crop again; DACS's quality weight with the `uda.pseudo_ignore_*` rows
   zeroed;
2. the strong augmentation of the source and of the target crop (`strong_source_target`): the
   jitter and blur decisions are the step's one draw each, shared with the mixed images (the
   released `strong_parameters`); colour factors, jitter order and blur sigma are per call;
3. the source statistics (`uda/sepico_stats.py`, the method state) updated with the teacher's
   projection of the weak source and the downscaled ground truth, every step from step 0,
   before any loss reads them;
4. the source cross-entropy on the strongly augmented source, plus (from `sepico.start_step`)
   the contrastive term on the student's projection of it with the ground truth;
5. from `sepico.start_step`, the contrastive term alone on the strongly augmented target crop
   with the pseudo-labels, the pixels of zero pseudo weight ignored (no confidence threshold);
6. ClassMix of the weak source and the weak target crop, its weighted cross-entropy (DACS).

The contrastive term is `losses/sepico.py: sepico_loss` (`sepico.variant`: 'dist', 'proto' or
'bank', plus the regulariser). No feature distance (`uda.fd_lambda` = 0, set by `configure`).

`sepico.day_night` is the released Cityscapes -> Dark Zurich variant (`sepico_dark.py`,
`SePiCoDark.forward_train`): the target batch carries each night image's paired day image
(`day_image`, `data.target.paired_day`); the teacher's softmax on the night image and on the day
image are mixed (`uda/day_night.py: mix_day_night_probs`, times the class weights of strength
`sepico.class_weight_strength`) and the pseudo-label, its confidence (the mixed, unnormalised
score) and the class-balanced crop come from the mixed scores; the crop box cuts night and day
alike and the teacher labels the two crops again; the cropped night image is the weak target.
The decode head's cross-entropies (source and mix) weigh each pixel by its class weight.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.labels import IGNORE_INDEX
from pgpc_jax.losses import sepico as sl
from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.models.heads import ProjectionHead
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.models.segmentor import DTYPES
from pgpc_jax.uda import class_balanced_crop as cbc
from pgpc_jax.uda import dacs, day_night, mixing, sepico_stats, teacher

VARIANTS = sl.VARIANTS
HEAD = "projection"  # the auxiliary head's name: params `auxiliary_head/projection`


def config_group() -> ml_collections.ConfigDict:
    """The `sepico` group, every value as released (`experiments.py` of the DAFormer-based runs)."""
    return ml_collections.ConfigDict(
        dict(
            # 'dist' (DistCL, the released best), 'proto' (ProtoCL) or 'bank' (BankCL).
            variant="dist",
            # First step of the contrastive terms (`start_distribution_iter`); the statistics
            # are updated from step 0.
            start_step=3000,
            # Similarities are divided by it (100, intentionally large).
            temperature=100.0,
            # DistCL's variance scale.
            ratio=1.0,
            # Weight of the regulariser (`reg_relative_weight`); 0 leaves it out.
            reg_weight=1.0,
            # Smallest share of the winning label in a 4x4 block for the block to be labelled.
            min_ratio=0.75,
            # BankCL's memory length per class (`memory_length`); unused by the other variants.
            bank_length=200,
            # Width of the projection head's embeddings.
            channels=512,
            # Class-balanced crop of the un-cropped target (`pseudo_random_crop`) to the source
            # crop's size, chosen on the teacher's pseudo-labels among `num_boxes` random boxes.
            class_balanced_crop=True,
            num_boxes=10,
            cat_max_ratio=0.75,
            # Teacher run again on the crop (`regen_pseudo`).
            regen_pseudo=True,
            # The day-night variant (`sepico_dark.py`, Cityscapes -> Dark Zurich): pseudo-labels
            # from the teacher on the night image and its paired day image (needs
            # data.target.paired_day), class-weighted decode-head cross-entropy.
            day_night=False,
            # Strength of the class weights of the mix and of the cross-entropy (released 0.05).
            class_weight_strength=day_night.TRAIN_STRENGTH,
            # Weight of a confident day prediction of a shift-insensitive class (`day_ratio`).
            day_ratio=day_night.DAY_RATIO,
        )
    )


def configure(config) -> None:
    """SePiCo as released on a DAFormer config: the `sepico` group and no feature distance (the
    benchmark configs set the crops, iterations and seed)."""
    config.sepico = config_group()
    config.uda.fd_lambda = 0.0


def validate(config) -> None:
    _settings(config)


def needs_teacher(config) -> bool:
    return True


def needs_imnet(config) -> bool:
    return dacs.needs_imnet(config)


def auxiliary_heads(config) -> dict:
    return {
        HEAD: ProjectionHead(channels=int(config.sepico.channels), dtype=DTYPES[config.model.dtype])
    }


def start_steps(config) -> dict[str, int]:
    """The projection head is trained from `sepico.start_step` on: before it the released step
    keeps the head out of every backward pass (`mode='dec'`), so torch's AdamW neither decays
    it nor starts its Adam state (`optim.make_optimizer`, `start_steps`)."""
    return {f"auxiliary_head/{HEAD}": int(config.sepico.start_step)}


def init_state(config, params) -> dict[str, jax.Array]:
    """Empty source statistics; a memory bank only for `variant='bank'`."""
    c = _settings(config)
    return sepico_stats.init_stats(c["num_classes"], c["channels"], c["bank_length"])


def _check_uncropped(image_size: tuple[int, int], crop_size: tuple[int, int]) -> None:
    """Without the class-balanced crop, the target must come at the source crop size."""
    if tuple(image_size) != tuple(crop_size):
        raise ValueError(
            f"sepico.class_balanced_crop=False: the target images are "
            f"{image_size[0]}x{image_size[1]} but the source crops {crop_size[0]}x{crop_size[1]}; "
            "set data.target.crop_size to the source crop size or enable the class-balanced crop"
        )


def _settings(config) -> dict[str, Any]:
    """The `sepico` group as plain Python values, validated."""
    c = config.sepico
    if c.variant not in VARIANTS:
        raise ValueError(f"sepico.variant={c.variant!r}: expected one of {VARIANTS}")
    for key, minimum in (("start_step", 0), ("num_boxes", 1), ("channels", 1)):
        if int(c[key]) < minimum:
            raise ValueError(f"sepico.{key}={c[key]!r}: expected an integer >= {minimum}")
    if c.variant == "bank" and int(c.bank_length) < 1:
        raise ValueError(f"sepico.bank_length={c.bank_length!r}: BankCL needs at least 1")
    if float(c.temperature) <= 0:
        raise ValueError(f"sepico.temperature={c.temperature!r}: expected a positive number")
    if c.day_night and not config.data.target.get("paired_day", False):
        raise ValueError(
            "sepico.day_night=True needs the night images' paired day images: set "
            "data.target.paired_day=True (Dark Zurich's train_night split), or use "
            "configs/cs2darkzurich.py:sepico"
        )
    if not 0.0 <= float(c.day_ratio) <= 1.0:
        raise ValueError(f"sepico.day_ratio={c.day_ratio!r}: expected a value in [0, 1]")
    class_weights = None
    if c.day_night:
        with jax.ensure_compile_time_eval():  # a constant, even when settings are read in a trace
            class_weights = np.asarray(
                day_night.class_weights(strength=float(c.class_weight_strength)), np.float32
            )
    return dict(
        num_classes=int(config.model.num_classes),
        variant=str(c.variant),
        start_step=int(c.start_step),
        channels=int(c.channels),
        bank_length=int(c.bank_length) if c.variant == "bank" else 0,
        min_ratio=float(c.min_ratio),
        loss=dict(
            reg_weight=float(c.reg_weight),
            temperature=float(c.temperature),
            ratio=float(c.ratio),
        ),
        crop=bool(c.class_balanced_crop),
        num_boxes=int(c.num_boxes),
        cat_max_ratio=float(c.cat_max_ratio),
        regen=bool(c.regen_pseudo),
        day_night=bool(c.day_night),
        # float32 [K] numpy (a constant of the step), None without the day-night variant.
        class_weights=class_weights,
        day_ratio=float(c.day_ratio),
    )


def contrast(proj: jax.Array, labels: jax.Array, stats: dict, c: dict) -> jax.Array:
    """The contrastive term of one forward: `sepico_loss` on the projection and full-resolution
    labels (downscaled to the projection's size by block majority).

    Args:
      proj: float [B, h, w, A] unit-norm embeddings (the gradient flows here).
      labels: int [B, H, W] ground truth or pseudo-labels, `IGNORE_INDEX` where ignored.
      stats: the source statistics (`uda/sepico_stats.py`), read as constants.
      c: `_settings(config)`.

    Returns:
      float32 scalar.
    """
    feats, lbl, valid = sl.prepare_contrast(
        proj, labels, num_classes=c["num_classes"], min_ratio=c["min_ratio"]
    )
    stats = jax.lax.stop_gradient(stats)
    bank = dict(bank=stats["bank"], bank_valid=stats["bank_valid"]) if "bank" in stats else {}
    return sl.sepico_loss(
        c["variant"],
        feats,
        lbl,
        valid,
        mean=stats["mean"],
        variance=stats["variance"],
        **bank,
        **c["loss"],
    )


def update_source_stats(
    stats: dict, teacher_proj: jax.Array, labels: jax.Array, c: dict
) -> dict[str, jax.Array]:
    """The released `update_proto` call: the teacher's projection of the weak source and the
    ground truth downscaled to it fold into the statistics (all images of the batch together).

    Args:
      stats: the statistics of the previous step.
      teacher_proj: [B, h, w, A] the teacher's projection-head output on the weak source.
      labels: int [B, H, W] the source ground truth.
      c: `_settings(config)`.
    """
    feats, lbl, valid = sl.prepare_contrast(
        teacher_proj, labels, num_classes=c["num_classes"], min_ratio=c["min_ratio"]
    )
    return sepico_stats.update_stats(stats, feats, lbl, valid)


def target_contrast_labels(pseudo_label: jax.Array, pseudo_weight: jax.Array) -> jax.Array:
    """The target contrast's labels: the pseudo-labels, ignored where the pseudo weight is 0 (the
    released `pseudo_lbl[pseudo_weight == 0] = 255`: the zeroed rows, or the whole crop when no
    pixel is confident). No confidence threshold otherwise."""
    return jnp.where(pseudo_weight == 0, IGNORE_INDEX, pseudo_label).astype(jnp.int32)


def crop_target(
    teacher_fwd: Callable[[jax.Array], dict],
    images: jax.Array,
    crop_size: Sequence[int],
    key: jax.Array,
    s: dict,
    c: dict,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """The weak target crop and its pseudo-labels (steps 1-2 of `SePiCo.forward_train`).

    With `class_balanced_crop`, the teacher labels the whole image, `choose_crop` picks the box
    of size `crop_size` on those labels and the image is cut; with `regen_pseudo` the teacher
    labels the crop again, else the whole image's labels are cut and the weight is the whole
    image's confident share (as released). The `uda.pseudo_ignore_*` rows are those of the crop.
    Without the crop, the target must already have `crop_size` (ClassMix pastes source on it).

    Args:
      teacher_fwd: the bound teacher forward.
      images: [B, H, W, 3] normalised weak target images.
      crop_size: (h, w), the source crop's size.
      key: PRNG key of the box draw.
      s: `dacs.settings(config)`; c: `_settings(config)`.

    Returns:
      (crop [B, h, w, 3], pseudo as `dacs.pseudo_label` at the crop, offsets int32 [B, 2]).
    """
    crop_size = tuple(int(x) for x in crop_size)
    batch, height, width = images.shape[:3]
    if not c["crop"]:
        _check_uncropped((height, width), crop_size)
        return images, dacs.pseudo_label(teacher_fwd, images, s), jnp.zeros((batch, 2), jnp.int32)
    logits = resize_bilinear(teacher_fwd(images)["logits"], (height, width))
    full_label = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    offsets = cbc.choose_crop(
        key, full_label, crop_size, c["num_boxes"], c["num_classes"], c["cat_max_ratio"]
    )
    crop = cbc.apply_crop(images, offsets, crop_size)
    if c["regen"]:
        return crop, dacs.pseudo_label(teacher_fwd, crop, s), offsets
    labels, weight, stats = teacher.pseudo_labels(logits, s["threshold"], 0, 0, s["per_pixel"])
    rows = teacher.kept_rows(crop_size[0], s["ignore_top"], s["ignore_bottom"])
    weight = cbc.apply_crop(weight, offsets, crop_size) * rows[None, :, None]
    pseudo = dict(
        logits=cbc.apply_crop(logits, offsets, crop_size),
        label=cbc.apply_crop(labels, offsets, crop_size),
        weight=weight * s["target_weight"],
        **stats,
    )
    return crop, pseudo, offsets


def day_night_scores(
    teacher_fwd: Callable[[jax.Array], dict], night: jax.Array, day: jax.Array, c: dict
) -> jax.Array:
    """The teacher's mixed day-night scores of night images (`SePiCoDark.mix_day_night_probs`
    of the softmax on the day and on the night images, times the class weights).

    The teacher runs on the day batch and on the night batch separately, as released (its
    BatchNorm layers use the statistics of the batch they see).

    Args:
      teacher_fwd: the bound teacher forward.
      night: [B, H, W, 3] normalised night images; day: [B, H, W, 3] their paired day images.
      c: `_settings(config)`.

    Returns:
      float32 [B, H, W, K] mixed scores (not renormalised).
    """
    size = night.shape[1:3]

    def softmax(images):
        logits = resize_bilinear(teacher_fwd(images)["logits"], size).astype(jnp.float32)
        return jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)

    p_day, p_night = softmax(day), softmax(night)
    return day_night.mix_day_night_probs(
        p_day, p_night, c["class_weights"], day_ratio=c["day_ratio"]
    )


def scores_pseudo_label(scores: jax.Array, s: dict) -> dict[str, jax.Array]:
    """Pseudo-labels and DACS's quality weight from mixed scores, as `dacs.pseudo_label` does
    from softmax probabilities: the released dark step takes `torch.max` of the mixed scores, so
    the label is their argmax and the confidence compared with `uda.pseudo_threshold` is the
    mixed (class-weighted, unnormalised) score itself.

    Args:
      scores: float32 [B, H, W, K] (`day_night_scores`).
      s: `dacs.settings(config)`.

    Returns:
      {'scores', 'label' int32 [B, H, W], 'weight' float32 [B, H, W], 'confidence',
       'coverage'} as `dacs.pseudo_label`.
    """
    confidence = jnp.max(scores, axis=-1)
    label = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    confident = (confidence >= s["threshold"]).astype(jnp.float32)
    coverage = jnp.mean(confident)
    weight = confident if s["per_pixel"] else jnp.broadcast_to(coverage, confident.shape)
    rows = teacher.kept_rows(scores.shape[1], s["ignore_top"], s["ignore_bottom"])
    weight = weight * rows[None, :, None].astype(jnp.float32) * s["target_weight"]
    return dict(
        scores=scores,
        label=label,
        weight=weight,
        confidence=jnp.mean(confidence),
        coverage=coverage,
    )


def crop_day_night_target(
    teacher_fwd: Callable[[jax.Array], dict],
    night: jax.Array,
    day: jax.Array,
    crop_size: Sequence[int],
    key: jax.Array,
    s: dict,
    c: dict,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
    """`crop_target` of the day-night variant (`SePiCoDark.forward_train` up to the strong
    augmentation): pseudo-labels from the mixed day-night scores of the whole images, the
    class-balanced box chosen on them and cut from the night and the day image alike, then with
    `regen_pseudo` the teacher labels the two crops again and they are mixed again. Without
    `regen_pseudo` the whole images' labels are cut and the weight is the whole images'
    confident share (as released). Without the crop, the images must already have `crop_size`.

    Args:
      teacher_fwd: the bound teacher forward.
      night, day: [B, H, W, 3] normalised night images and their paired day images.
      crop_size: (h, w), the source crop's size.
      key: PRNG key of the box draw.
      s: `dacs.settings(config)`; c: `_settings(config)`.

    Returns:
      (night crop [B, h, w, 3] (the weak target), day crop [B, h, w, 3], pseudo as
       `scores_pseudo_label` at the crop, offsets int32 [B, 2]).
    """
    crop_size = tuple(int(x) for x in crop_size)
    batch, height, width = night.shape[:3]
    if day.shape != night.shape:
        raise ValueError(f"day images {day.shape} differ from the night images {night.shape}")
    if not c["crop"]:
        _check_uncropped((height, width), crop_size)
        pseudo = scores_pseudo_label(day_night_scores(teacher_fwd, night, day, c), s)
        return night, day, pseudo, jnp.zeros((batch, 2), jnp.int32)
    # The box is chosen on the whole images' labels (no rows zeroed: the released crop reads
    # the labels only).
    full = scores_pseudo_label(
        day_night_scores(teacher_fwd, night, day, c),
        {**s, "ignore_top": 0, "ignore_bottom": 0, "target_weight": 1.0},
    )
    offsets = cbc.choose_crop(
        key, full["label"], crop_size, c["num_boxes"], c["num_classes"], c["cat_max_ratio"]
    )
    night_crop = cbc.apply_crop(night, offsets, crop_size)
    day_crop = cbc.apply_crop(day, offsets, crop_size)
    if c["regen"]:
        pseudo = scores_pseudo_label(day_night_scores(teacher_fwd, night_crop, day_crop, c), s)
        return night_crop, day_crop, pseudo, offsets
    rows = teacher.kept_rows(crop_size[0], s["ignore_top"], s["ignore_bottom"])
    weight = cbc.apply_crop(full["weight"], offsets, crop_size) * rows[None, :, None]
    pseudo = dict(
        full,
        scores=cbc.apply_crop(full["scores"], offsets, crop_size),
        label=cbc.apply_crop(full["label"], offsets, crop_size),
        weight=weight * s["target_weight"],
    )
    return night_crop, day_crop, pseudo, offsets


def decode_head_weights(labels: jax.Array, c: dict, weight: jax.Array | None = None):
    """Pixel weights of a decode-head cross-entropy: `weight` times, in the day-night variant,
    each pixel's class weight (the released `loss_decode.class_weight`, torch's class-weighted
    cross-entropy, on the source and the mixed images); `weight` unchanged otherwise."""
    if c["class_weights"] is None:
        return weight
    per_class = day_night.pixel_class_weights(labels, c["class_weights"], IGNORE_INDEX)
    return per_class if weight is None else weight * per_class


def method_keys(keys: dacs.Keys) -> dict[str, jax.Array]:
    """The method's own keys of a step, from `keys.method`: the crop box draw, the target
    forward's dropout, and the colour factors, jitter order and blur sigma of the source's and
    of the target crop's strong augmentation."""
    k_crop, k_target, k_source_aug, k_target_aug = jax.random.split(keys.method, 4)
    return dict(crop=k_crop, target=k_target, source_aug=k_source_aug, target_aug=k_target_aug)


def strong_source_target(
    keys: dacs.Keys, mk: dict, src_images: jax.Array, tgt_images: jax.Array, s: dict
) -> tuple[jax.Array, jax.Array]:
    """The strong augmentation of the source and of the weak target crop (the released
    `strong_transform` on the source batch, then on the target batch).

    The jitter and blur decisions come from `keys.augment`, the key of the mixed images'
    augmentation, so the three share the step's one draw of each (the released
    `strong_parameters`); the colour factors, the jitter order and the blur sigma are fresh for
    each call, as kornia and `gaussian_blur` draw them per call: one order and one sigma for
    the source batch, another for the target batch (the mixed images get theirs per image).

    Args:
      keys: the step's `dacs.split_keys`; mk: `method_keys(keys)`.
      src_images, tgt_images: [B, h, w, 3] normalised weak source and weak target crop.
      s: `dacs.settings(config)`.

    Returns:
      (strong source, strong target), float32 like the inputs.
    """
    common = dict(s["jitter"], decision_rng=keys.augment, per_call=True)
    src_strong, _ = mixing.strong_augment(mk["source_aug"], src_images, **common)
    tgt_strong, _ = mixing.strong_augment(mk["target_aug"], tgt_images, **common)
    return src_strong, tgt_strong


def make_losses(config):
    s, c = dacs.settings(config), _settings(config)

    def losses(ctx):
        keys = dacs.split_keys(ctx.rng)
        mk = method_keys(keys)
        k_crop, k_target = mk["crop"], mk["target"]
        src = ctx.src
        if c["day_night"]:
            if "day_image" not in ctx.tgt:
                raise ValueError(
                    "sepico.day_night=True: the target batch has no day_image; set "
                    "data.target.paired_day=True"
                )
            # The cropped night image is the weak target; the day crop only labels it.
            tgt_weak, _, pseudo, _ = crop_day_night_target(
                ctx.teacher,
                ctx.tgt["image"],
                ctx.tgt["day_image"],
                src["image"].shape[1:3],
                k_crop,
                s,
                c,
            )
        else:
            tgt_weak, pseudo, _ = crop_target(
                ctx.teacher, ctx.tgt["image"], src["image"].shape[1:3], k_crop, s, c
            )
        src_strong, tgt_strong = strong_source_target(keys, mk, src["image"], tgt_weak, s)

        # Statistics before any loss, from the teacher on the weak source.
        stats = update_source_stats(
            ctx.method_state, ctx.teacher(src["image"], auxiliary_only=True)[HEAD], src["label"], c
        )
        active = ctx.step >= c["start_step"]

        losses, source = dacs.source_losses(
            ctx.student, ctx.imnet, {**src, "image": src_strong}, keys.source, s
        )
        if c["class_weights"] is not None:  # the day-night variant's class-weighted CE
            losses["loss_src"] = cross_entropy(
                source["logits"], src["label"], decode_head_weights(src["label"], c)
            )
        losses["loss_contrast_src"] = active.astype(jnp.float32) * contrast(
            source[HEAD], src["label"], stats, c
        )

        # Target contrast only from start_step (before it the released step has no target
        # forward): a real conditional. It runs the projection head alone in the released code
        # (`mode='aux'`), so only the head's BatchNorm statistics are kept from it.
        tgt_labels = target_contrast_labels(pseudo["label"], pseudo["weight"])
        student = ctx.student

        def run_target(batch_stats):
            out, updated = student.model.apply(
                {"params": student.params, "batch_stats": batch_stats},
                tgt_strong,
                train=True,
                rngs={"dropout": k_target},
                mutable=["batch_stats"],
                method=student.model.auxiliary_outputs,  # no decode head (`mode='aux'`)
            )
            kept = dict(batch_stats)
            kept["auxiliary_head"] = updated["batch_stats"]["auxiliary_head"]
            return contrast(out[HEAD], tgt_labels, stats, c), kept

        def skip_target(batch_stats):
            return jnp.zeros((), jnp.float32), dict(batch_stats)

        loss_tgt, student.batch_stats = jax.lax.cond(
            active, run_target, skip_target, dict(student.batch_stats)
        )
        losses["loss_contrast_tgt"] = loss_tgt

        mix = dacs.class_mix(keys, src, tgt_weak, pseudo, s)
        mixed = student(mix["image"], keys.mix_dropout)
        losses["loss_mix"] = cross_entropy(
            mixed["logits"], mix["label"], decode_head_weights(mix["label"], c, mix["weight"])
        )
        metrics = {
            "pseudo_confidence": pseudo["confidence"],
            "pseudo_coverage": pseudo["coverage"],
            "jitter": mix["jitter"],
            "blur": mix["blur"],
        }
        return losses, stats, metrics

    return losses
