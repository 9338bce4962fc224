"""SePiCo's contrastive losses (ProtoCL, DistCL, BankCL and the regulariser) with explicit inputs.

Source [released]: SePiCo (Xie et al., TPAMI 2023), `mmseg/models/losses/contrastive_loss.py` of
the released code (`docs/method.md`): `downscale_label_ratio`, `contrast_preparations`,
`proto_reg`, `proto_contrastive`, `dist_contrastive`, `bank_contrastive` and the composition in
`ContrastiveLoss.forward`. The class statistics they read (running mean, diagonal variance and the
per-class memory bank of batch centroids) are inputs here; updating them belongs to the method.

Conventions: NHWC; the projected embeddings z come in already L2-normalised (the projection head
normalises them); similarities are DIVIDED by the temperature, which is 100 in every released
experiment (logits = z . mu / 100). Where the released code removes the ignored pixels
(`feat[mask != 255]`), these functions keep every pixel and take a `valid` mask: a loss is the
mean over valid pixels, and 0 (with a zero gradient) when no pixel is valid, as the released
functions return 0 for an empty selection. Static shapes throughout; everything jits.

Choices where the released code leaves a case open (each an argument or documented rule):

* `downscale_labels`: ties between bins go to the lowest class id, the ignore bin last (as
  `torch.max` on CPU); they matter only for `min_ratio <= 0.5`. A fraction exactly equal to
  `min_ratio` is kept (the released test is `ratio < min_ratio`). Labels outside [0, C) other than
  the ignore index vote with the ignore bin (the released one-hot would fail on them). Rows and
  columns beyond a multiple of `scale` are dropped (`avg_pool2d` floors).
* `bank_contrastive`: the released memory bank is never empty (each class deque starts with one
  zero vector). For a bank slot mask with an empty class, that class is left out of the
  negatives, and anchors of that class are left out of the loss and of its mean.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from data_pipelines.labels import IGNORE_INDEX

VARIANTS = ("proto", "dist", "bank")


def _float_dtype(x: jax.Array) -> jnp.dtype:
    # At least float32 (bf16 features are promoted); float64 stays float64 (gradient checks).
    return jnp.promote_types(x.dtype, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Labels and pixels [released: downscale_label_ratio, contrast_preparations]


def downscale_labels(
    labels: jax.Array,
    scale: int,
    num_classes: int,
    min_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Labels [B, H, W] to [B, H // scale, W // scale] by block majority with a purity threshold.

    As SePiCo's `downscale_label_ratio`: the labels one-hot with the ignore label in an extra bin
    C, averaged over scale x scale blocks (kernel = stride = scale); the block takes the bin with
    the largest fraction, and the ignore label when that bin is the ignore bin or when the
    fraction is below `min_ratio` (exactly `min_ratio` is kept). `scale == 1` returns the labels
    unchanged, as the reference does.

    Args:
      labels: int [B, H, W].
      scale: block size, the ratio of label to feature resolution (4 at stride 4).
      num_classes: C.
      min_ratio: the smallest kept fraction of the winning bin.
      ignore_index: the ignore label (in and out).

    Returns:
      int32 [B, H // scale, W // scale].
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    labels = jnp.asarray(labels, jnp.int32)
    if scale == 1:
        return labels
    batch, height, width = labels.shape
    out_h, out_w = height // scale, width // scale
    labels = labels[:, : out_h * scale, : out_w * scale]
    known = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    bins = jnp.where(known, labels, num_classes)  # the ignore bin is C
    blocks = bins.reshape(batch, out_h, scale, out_w, scale)
    counts = jnp.sum(
        jax.nn.one_hot(blocks, num_classes + 1, dtype=jnp.int32), axis=(2, 4)
    )  # [B, h, w, C + 1]
    # The fraction as avg_pool2d gives it in float32: an exact count over scale^2.
    ratio = jnp.max(counts, axis=-1).astype(jnp.float32) / float(scale * scale)
    winner = jnp.argmax(counts, axis=-1).astype(jnp.int32)  # first maximum on ties
    keep = (winner != num_classes) & ~(ratio < min_ratio)
    return jnp.where(keep, winner, jnp.int32(ignore_index))


def flatten_pixels(
    proj: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projected embeddings and labels at the same resolution to flat pixel arrays.

    As `contrast_preparations` after its downscaling, with a mask instead of removing the ignored
    pixels: rows are batch-major (image, row, column), the order of the reference's
    `permute(0, 2, 3, 1).view(-1, A)`.

    Args:
      proj: [B, h, w, A] projection-head output.
      labels: int [B, h, w] (already at the embeddings' resolution).
      ignore_index: the ignore label; such pixels are invalid (their label is set to 0).

    Returns:
      (feats [N, A], labels int32 [N], valid bool [N]) with N = B * h * w.
    """
    if proj.shape[:3] != labels.shape:
        raise ValueError(
            f"embeddings {tuple(proj.shape)} and labels {tuple(labels.shape)} differ in [B, h, w]"
        )
    feats = proj.reshape(-1, proj.shape[-1])
    flat = jnp.asarray(labels, jnp.int32).reshape(-1)
    valid = (flat != ignore_index) & (flat >= 0)
    return feats, jnp.where(valid, flat, 0), valid


def prepare_contrast(
    proj: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    min_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Full-resolution labels and the projection-head output to flat (feats, labels, valid).

    As `contrast_preparations` with `use_avg_pool=True` (every released experiment): the scale is
    label width // embedding width, the labels are downscaled with `downscale_labels`, then
    flattened with `flatten_pixels`.

    Args:
      proj: [B, h, w, A] projection-head output.
      labels: int [B, H, W] full-resolution labels (ground truth or pseudo-labels).
      num_classes: C.
      min_ratio: `downscale_labels`'s purity threshold (0.75 released).
      ignore_index: the ignore label.

    Returns:
      (feats [N, A], labels int32 [N], valid bool [N]) with N = B * h * w.
    """
    scale = labels.shape[-1] // proj.shape[2]
    if scale < 1:
        raise ValueError(
            f"labels {tuple(labels.shape)} are narrower than the embeddings {tuple(proj.shape)}"
        )
    small = downscale_labels(labels, scale, num_classes, min_ratio, ignore_index)
    if small.shape != proj.shape[:3]:
        raise ValueError(
            f"labels {tuple(labels.shape)} downscaled by {scale} give {tuple(small.shape)}, "
            f"not the embeddings' {tuple(proj.shape[:3])}: give labels at an integer multiple "
            "of the embedding size"
        )
    return flatten_pixels(proj, small, ignore_index)


# ------------------------------------------------------------------------------------------------
# Losses [released]


def _inputs(feats, labels, valid):
    feats = jnp.asarray(feats)
    z = feats.astype(_float_dtype(feats))
    valid = jnp.asarray(valid) != 0
    labels = jnp.where(valid, jnp.asarray(labels, jnp.int32), 0)
    return z, labels, valid


def _masked_mean(per_pixel: jax.Array, valid: jax.Array) -> jax.Array:
    # Mean over valid entries, 0 when there is none; invalid entries get a zero gradient.
    count = jnp.sum(valid).astype(per_pixel.dtype)
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(count, 1.0)


def _pick(x: jax.Array, labels: jax.Array) -> jax.Array:
    # x[i, labels[i]] for x [N, C].
    return jnp.take_along_axis(x, labels[:, None], axis=1)[:, 0]


def proto_contrastive(
    feats: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    mean: jax.Array,
    temperature: float = 100.0,
) -> jax.Array:
    """ProtoCL: cross-entropy of the similarities to every class mean [released].

    l_i = -log softmax_c(z_i . mu_c / temperature)[y_i], averaged over valid pixels. All C rows
    of `mean` are used, also those of classes without statistics yet (zero mean, logit 0), as in
    the reference.

    Args:
      feats: [N, A] embeddings z (the gradient flows here).
      labels: int [N] class ids in [0, C) where valid.
      valid: bool or float [N]; nonzero = valid.
      mean: [C, A] class means (no gradient).
      temperature: divides the similarities (100 released).

    Returns:
      float scalar; 0 when no pixel is valid.
    """
    z, labels, valid = _inputs(feats, labels, valid)
    mu = jax.lax.stop_gradient(jnp.asarray(mean, z.dtype))
    logits = jnp.matmul(z, mu.T) / temperature  # [N, C]
    per_pixel = jax.nn.logsumexp(logits, axis=1) - _pick(logits, labels)
    return _masked_mean(per_pixel, valid)


def dist_contrastive(
    feats: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    mean: jax.Array,
    variance: jax.Array,
    temperature: float = 100.0,
    ratio: float = 1.0,
) -> jax.Array:
    """DistCL: the closed-form bound of InfoNCE over Gaussian class distributions [released].

    With the diagonal class variances s2_c:
      logit_ic = (z_i . mu_c + 0.5 * sum_a z_ia^2 s2_ca * ratio / temperature) / temperature,
      l_i = CE(logit_i, y_i) + 0.5 * sum_a z_ia^2 s2_{y_i a} * ratio / temperature^2,
    the added term cancelling the variance part of the positive logit, so
      l_i = logsumexp_c(logit_ic) - z_i . mu_{y_i} / temperature,
    which is how it is computed here. Averaged over valid pixels.

    Args:
      feats: [N, A] embeddings z (the gradient flows here).
      labels: int [N] class ids in [0, C) where valid.
      valid: bool or float [N]; nonzero = valid.
      mean: [C, A] class means (no gradient).
      variance: [C, A] diagonal class variances (no gradient).
      temperature: divides the logits, and the variance once more (100 released).
      ratio: scales the variance (1.0 released).

    Returns:
      float scalar; 0 when no pixel is valid.
    """
    z, labels, valid = _inputs(feats, labels, valid)
    mu = jax.lax.stop_gradient(jnp.asarray(mean, z.dtype))
    s2 = jax.lax.stop_gradient(jnp.asarray(variance, z.dtype))
    sim = jnp.matmul(z, mu.T)  # [N, C]
    spread = 0.5 * jnp.matmul(jnp.square(z), (s2 * (ratio / temperature)).T)  # [N, C]
    logits = (sim + spread) / temperature
    per_pixel = jax.nn.logsumexp(logits, axis=1) - _pick(sim, labels) / temperature
    return _masked_mean(per_pixel, valid)


def _masked_logsumexp(s: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise log sum_{mask} exp(s) over the last axis: (lse, any), lse = 0 on empty rows.

    Masked terms are excluded exactly and get a zero gradient, with no inf or NaN anywhere.
    """
    has = jnp.any(mask, axis=-1)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
    top = jnp.where(has, top, 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, s - top[..., None], 0.0)), 0.0), -1)
    return jnp.where(has, top + jnp.log(jnp.where(has, total, 1.0)), 0.0), has


def bank_contrastive(
    feats: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    bank: jax.Array,
    bank_valid: jax.Array,
    temperature: float = 100.0,
) -> jax.Array:
    """BankCL: InfoNCE against the memory bank of class centroids [released].

    For anchor i of class y: positives s_j = z_i . b_j / temperature for the entries b_j of
    Bank[y]; for every other class k one negative, the mean similarity
    n_k = mean_{b in Bank[k]} z_i . b / temperature (= z_i . mean(Bank[k]) / temperature);
      l_i = mean_j -log(e^{s_j} / (e^{s_j} + sum_{k != y} e^{n_k})),
    averaged over valid anchors. The released bank starts with one zero vector per class, which
    counts as an entry (similarity 0) until pushed out: give it as a filled slot.

    Args:
      feats: [N, A] embeddings z (the gradient flows here).
      labels: int [N] class ids in [0, C) where valid.
      valid: bool or float [N]; nonzero = valid.
      bank: [C, L, A] class banks (no gradient); slots are read only where `bank_valid`, and
        unused slots must hold finite values (zeros).
      bank_valid: bool [C, L], the slots holding an entry. A class without any is no negative,
        and its anchors are left out (the released bank is never empty).
      temperature: divides the similarities (100 released).

    Returns:
      float scalar; 0 when no anchor is valid.
    """
    z, labels, valid = _inputs(feats, labels, valid)
    bank = jax.lax.stop_gradient(jnp.asarray(bank, z.dtype))  # [C, L, A]
    slot = jnp.asarray(bank_valid) != 0  # [C, L]
    num_classes = bank.shape[0]
    entries = jnp.sum(slot, axis=1)  # [C]
    filled = entries > 0
    centroid = (
        jnp.sum(jnp.where(slot[..., None], bank, 0.0), axis=1)
        / jnp.maximum(entries, 1).astype(z.dtype)[:, None]
    )  # [C, A]
    neg = jnp.matmul(z, centroid.T) / temperature  # [N, C]
    others = filled[None, :] & (jnp.arange(num_classes)[None, :] != labels[:, None])
    lse_neg, has_neg = _masked_logsumexp(neg, others)  # [N]

    def own_class_term(per_anchor, xs):
        # The anchors of class c against Bank[c]; one [N, L] block at a time (checkpointed, so
        # the backward pass keeps no [N, C, L] array).
        c, entries_c, slot_c = xs
        s = jnp.matmul(z, entries_c.T) / temperature  # [N, L]
        # -log(e^s / (e^s + e^lse)) = softplus(lse - s); exactly 0 without any negative.
        term = jnp.where(has_neg[:, None], jax.nn.softplus(lse_neg[:, None] - s), 0.0)
        term = jnp.sum(jnp.where(slot_c[None, :], term, 0.0), axis=1) / jnp.maximum(
            jnp.sum(slot_c), 1
        ).astype(z.dtype)
        return jnp.where(labels == c, term, per_anchor), None

    per_anchor, _ = jax.lax.scan(
        jax.checkpoint(own_class_term),
        jnp.zeros(z.shape[:1], z.dtype),
        (jnp.arange(num_classes), bank, slot),
    )
    return _masked_mean(per_anchor, valid & filled[labels])


def proto_regularizer(
    feats: jax.Array, valid: jax.Array, mean: jax.Array, temperature: float = 100.0
) -> jax.Array:
    """SePiCo's regulariser on the batch-mean embedding [released: `proto_reg`].

    With z_bar the mean of the valid embeddings:
      L_reg = (1 / (C log C)) * sum_c log softmax_c(z_bar . mu_c / temperature),
    at most -1 (reached by the uniform softmax): minimising it pushes the softmax away from
    uniform, as coded.

    Args:
      feats: [N, A] embeddings z (the gradient flows here).
      valid: bool or float [N]; nonzero = valid.
      mean: [C, A] class means (no gradient), C >= 2.
      temperature: divides the similarities (100 released).

    Returns:
      float scalar; 0 when no pixel is valid.
    """
    num_classes = mean.shape[0]
    if num_classes < 2:
        raise ValueError(f"the regulariser needs at least 2 classes, got mean {mean.shape}")
    z, _, valid = _inputs(feats, jnp.zeros(feats.shape[:1], jnp.int32), valid)
    mu = jax.lax.stop_gradient(jnp.asarray(mean, z.dtype))
    count = jnp.sum(valid).astype(z.dtype)
    z_bar = jnp.sum(jnp.where(valid[:, None], z, 0.0), axis=0) / jnp.maximum(count, 1.0)
    log_p = jax.nn.log_softmax(jnp.matmul(mu, z_bar) / temperature)  # [C]
    reg = jnp.sum(log_p) / (num_classes * math.log(num_classes))
    return jnp.where(count > 0, reg, 0.0)


def sepico_loss(
    variant: str,
    feats: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    *,
    mean: jax.Array,
    variance: jax.Array | None = None,
    bank: jax.Array | None = None,
    bank_valid: jax.Array | None = None,
    reg_weight: float = 1.0,
    temperature: float = 100.0,
    ratio: float = 1.0,
) -> jax.Array:
    """One SePiCo contrastive term: the variant's loss + reg_weight * the regulariser [released].

    As `ContrastiveLoss.forward` with loss_weight 1 (`reg_relative_weight` = 1.0 in every released
    experiment); the regulariser always reads the class means, BankCL included; a reg_weight
    of 0 or less leaves it out, as in the reference.

    Args:
      variant: 'proto' (ProtoCL), 'dist' (DistCL) or 'bank' (BankCL).
      feats: [N, A] embeddings z (the gradient flows here).
      labels: int [N] class ids in [0, C) where valid.
      valid: bool or float [N]; nonzero = valid.
      mean: [C, A] class means.
      variance: [C, A] diagonal class variances ('dist').
      bank: [C, L, A] memory bank and bank_valid bool [C, L] its filled slots ('bank').
      reg_weight: weight of the regulariser.
      temperature: divides the similarities (100 released).
      ratio: DistCL's variance scale (1.0 released).

    Returns:
      float scalar; 0 when no pixel is valid.
    """
    if variant == "proto":
        loss = proto_contrastive(feats, labels, valid, mean, temperature)
    elif variant == "dist":
        if variance is None:
            raise ValueError("sepico_loss('dist') needs variance=[C, A]")
        loss = dist_contrastive(feats, labels, valid, mean, variance, temperature, ratio)
    elif variant == "bank":
        if bank is None or bank_valid is None:
            raise ValueError("sepico_loss('bank') needs bank=[C, L, A] and bank_valid=[C, L]")
        loss = bank_contrastive(feats, labels, valid, bank, bank_valid, temperature)
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if reg_weight > 0:  # the reference adds the regulariser only for a positive weight
        loss = loss + reg_weight * proto_regularizer(feats, valid, mean, temperature)
    return loss
