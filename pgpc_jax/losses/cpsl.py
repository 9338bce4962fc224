"""CPSL's stage-1 losses (Sinkhorn self-labelling, prototype rectification, RCE, prototype
consistency, bank contrast) and prototype bookkeeping (class means, EMA) with explicit inputs.

Source [released]: CPSL (Li et al., CVPR 2022), `models/adaptation_modelv2.py` of lslrh/CPSL:
`CustomModel.sinkhorn`, `CustomModel.rce`, `CustomModel.get_prototype_weight`, and the
rectification and self-labelling blocks inline in `CustomModel.step`; the cross-entropy is
`models/utils.py: cross_entropy2d` (`F.cross_entropy(ignore_index=250)`, mean over the kept
pixels). The memory banks the self-labelling loss reads are inputs here (see
`pgpc_jax/uda/ring_buffer.py`); pushing into them belongs to the method.

Conventions: class axis LAST (NHWC maps, [N, K] score rows); the ignore label is the project's
`IGNORE_INDEX` (255) where the released code uses 250. Static shapes; everything jits.

The released stage-1 step, as these functions serve it:

* Rectification [released]: `y = argmax_c P_SL * P_ST` with P_SL = softmax(cos(f_ema, W_ema)/T)
  (`prototype_probabilities`) and P_ST the warm-up model's saved soft pseudo-label; pixels whose
  normalised maximum (max_c r_c / sum_c r_c) is below `train_thred` become ignored. The released
  default `train_thred = 0` ignores nothing. Soft labels have no ignore entries.
* L_CTS [released]: `rce_alpha * CE + rce_beta * RCE` = 0.1 CE + 1.0 RCE (`cts_loss`), both on
  the student's logits at the label resolution (crop / 4; `cross_entropy2d` refuses other sizes).
* L_SL [released], per image, two terms with the SAME current scores s = cos(f_ema, W) of 256
  sampled EMA features against the self-labelling head W (gradient reaches W only):
  term 1 assigns with Sinkhorn over [feature bank . W^T (un-normalised W); s], term 2 over
  [logit bank; L2-normalised EMA logits of the same pixels]; each is
  `-mean_n sum_c q log softmax(s / T)` on the last 256 rows of the assignment
  (`self_labelling_loss`, composed per image by `cpsl_self_labelling_losses`). L_SL is the mean
  over images of (term 1 + term 2).

Released quirks, kept or noted (a method composing these functions decides):

* [released] The Sinkhorn exponent has no max-subtraction: `exp(S / eps)` overflows float32 once
  a score exceeds 88.7 * eps (4.4 at eps = 0.05). Here each class's maximum over the samples is
  subtracted first; the first row normalisation cancels it exactly, so the numbers are the
  released ones up to rounding and stay finite for any scores. A sample more than 87 * eps below
  every class's best sample underflows to a zero row (released: NaN or inf, float32); cosine
  scores span at most 2 = 40 * eps, so this needs the bank's un-normalised W to grow past norm
  ~2. Masked bank rows (`valid`) get zero mass.
* [released] The bank part of term 1 is scored with the UN-normalised head W
  (`torch.mm(queue, self.prototypes.t())`), the current rows with the normalised one.
* [released] The banks enter the Sinkhorn only once full (`not torch.all(queue[-1] == 0)`:
  the queue is zero-initialised and the newest rows are written at the top, so its last row is
  non-zero only after L / 256 pushes); before, the Sinkhorn runs over the 256 current rows
  alone. Both cases are one fixed-shape call here with `bank_valid` all False / all True.
* [released] The queues are pushed per image INSIDE the loop over the batch, after that image's
  scores were taken: image i of a batch sees the rows of images 0..i-1. The row order inside
  the bank does not change the current rows' assignment (the Sinkhorn treats samples
  symmetrically), so a ring buffer gives the released numbers up to summation order.
* [released] The 256 sampled positions (`torch.randperm`) are the same for every image of the
  batch; sampling belongs to the method, which passes the sampled rows.
* [released] The queue labels (`label_SL_DS`) are NOT permuted with the features' random index
  and come from the weak-crop label map resized to the full-image grid (spatially misaligned);
  they only feed the 0.001-weighted contrastive term (`bank_contrast`).
* [released] The EMA teacher is never put in eval mode: dropout on its features and batch
  statistics are active when it computes f_ema (a model-side choice, noted here because these
  losses consume f_ema).
* [released] The prior r is the fixed `Pseudo/class_distribution.npy` (class shares of the
  warm-up model's argmax over Cityscapes train, sums to 1); no moving-average update exists in
  the released code; `prior_ema` is the reconstructed alternative (below).
* [released] RCE clamps softmax to [1e-7, 1] and the one-hot to [1e-4, 1] and divides by
  (kept pixels + 1e-6): per pixel it is -log(1e-4) * sum_{c != y} max(p_c, 1e-7).
* [fixed shape] The released cross-entropy is NaN when every pixel is ignored; `cts_loss`'s CE
  gives 0 there (RCE gives 0 as released, thanks to its + 1e-6). Labels outside [0, C) other
  than the ignore label (a released one-hot error) count as ignored.
* [reconstructed] Ties in the rectification's argmax go to the lowest class id (jnp.argmax;
  torch's CUDA `max(1)` does not specify).

The rest of the released stage-1 step and its bookkeeping:

* L_cons [released: the `proto_consistW > 0` block of `step`] (`consistency_kl`): teacher
  p = softmax(cos(f_ema, W_ema) / T) on the weak view, warped by the strong view's geometric ops
  (`label_strong_T`: flip, nearest-neighbour affine, cutout; uncovered pixels set to 250);
  student log q = log_softmax(cos(f_student(strong), W_ema) / T). Both sides score with the EMA
  prototypes W_ema, not W. `F.kl_div(log q, p, reduction='none')` = p (log p - log q) per
  (pixel, class); the mask `warped_scores != 250` is per (pixel, class) element and the masked
  sum is divided by the mask's sum, so L_cons is the mean over valid pixels AND classes:
  (1 / K) sum_c KL_c per pixel, averaged over the valid pixels (the stage-1 weight 5 acts as
  5 / K on the per-pixel KL). The teacher trains nothing: f_ema comes from the no-grad EMA model
  and W_ema, though `requires_grad=True`, is in no optimizer and moves by the EMA only; the
  teacher side is under `stop_gradient` here, and the student's gradient reaches the student's
  features only.
* [released] `label_strong_T` adds 1, warps with zero fill, marks exact zeros as padding and
  subtracts 1: a warped score of exactly -1 would also read as padding, for that class only.
  Cosine scores reach -1 only for exactly opposite vectors; the mask is an input here, per pixel
  or per (pixel, class).
* [fixed shape] The released L_cons is NaN (0 / 0) when no pixel is valid; 0 here.
* W initialisation [released: `calc_prototype.py`, `train.py`] (`class_means`,
  `initial_prototypes`): offline, the warm-up model in eval mode runs over Cityscapes train
  (4 epochs, no augmentation); for each image and each class with at least 10 argmax-predicted
  pixels at the feature stride it takes that image's mean feature of the class
  (`Class_Features.calculate_mean_vector`), and the centroid is the running mean of these
  per-image means (`update_objective_SingleVector(..., 'mean')`; its count is capped at 3000,
  after which each new image weighs 1 / 3001). The file is saved, and `train.py` loads it and
  sets W = W_ema = F.normalize(centroids) (L2 per row). A class never predicted keeps its zero
  centroid and so a zero row in W (F.normalize(0) = 0): its cosine score is 0 for every feature
  until L_SL moves the row. Here the centroids are computed from arrays given at the first step
  (the method decides which features and labels); absent classes give the same zero rows.
* [released] At initialisation W and W_ema share storage (`.data = w` twice), so the first SGD
  step moves W_ema with W in place, and the EMA line of that step then gives W_ema = W_1 (not
  0.999 W_0 + 0.001 W_1); from then on they are separate. A one-step difference of lr-sized
  updates; a method may mirror it by copying W into W_ema after its first step.
* EMA [released] (`ema_update`): after each SGD step W_ema <- 0.999 W_ema + (1 - 0.999) W
  (the same form as the EMA model's parameters; its BN buffers are copied), with no
  normalisation of either W_ema or W afterwards (W drifts in norm; every use normalises it
  except the bank part of term 1). The released `proto_momentum = 1e-4` is the momentum of
  ProDA's centroid moving average (`update_objective_SingleVector`), unused in stage 1.
* Bank contrast [released: `CustomModel.contrastive`] (`bank_contrast`), weight 0.001, run only
  in iterations without CutMix once the feature queue is full: 256 random L2-normalised student
  weak-view features per image (stride 8, before any resize) against the whole queue (the
  queue already holds this step's EMA rows), labels equal = positive, no self-exclusion;
  each positive has its own denominator (itself plus all negatives), the per-anchor mean over
  positives divides by (#positives + 1e-5) (an anchor without positives gives 0 and still
  counts in the mean over anchors), the loss is averaged over anchors and then over images.
  Labels are compared as values, so ignored labels (250) are positives of each other
  [released]; with the default `train_thred = 0` none occur.
* Prior EMA [reconstructed] (`prior_ema`): the paper aligns the assignments' class marginal
  with the pseudo-labels' class distribution; the release uses the fixed file above. The
  `cpsl.prior = 'ema'` alternative keeps r as a running average of the teacher's predicted
  class shares per step: r <- m r + (1 - m) shares, unchanged by a step with no valid pixel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from data_pipelines.labels import IGNORE_INDEX
from pgpc_jax.losses.contrast import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST

# The released defaults (`parser_train.py`).
TEMPERATURE = 0.08
EPSILON = 0.05
SINKHORN_ITERATIONS = 3
RCE_ALPHA = 0.1  # the CE weight inside L_CTS
RCE_BETA = 1.0  # the RCE weight inside L_CTS
SOFTMAX_FLOOR = 1e-7  # RCE's clamp on the softmax
ONE_HOT_FLOOR = 1e-4  # RCE's clamp on the one-hot
EMA_MOMENTUM = 0.999  # W_ema and the EMA model (hard-coded in `step`)
PROTOTYPE_MIN_PIXELS = 10  # calc_prototype.py: an image's class mean needs >= 10 pixels
CONTRAST_EPS = 1e-5  # `contrastive`: added to the positive count


def _float_dtype(x: jax.Array) -> jnp.dtype:
    # At least float32 (bf16 inputs are promoted); float64 stays float64 (gradient checks).
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Sinkhorn with a class prior [released: CustomModel.sinkhorn]


def sinkhorn(
    scores: jax.Array,
    prior: jax.Array,
    epsilon: float = EPSILON,
    iters: int = SINKHORN_ITERATIONS,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Soft assignments of B samples to K classes with class marginals drawn towards `prior`.

    `CustomModel.sinkhorn` operation for operation, on Q = exp(S / eps)^T of shape [K, B]:

        Q /= sum(Q)                                # the whole matrix sums to 1
        repeat iters times:
            Q /= Q.sum(axis=1)   (each class row)  # then
            Q *= prior[:, None]                    # row c sums to r_c
            Q /= Q.sum(axis=0)   (each sample col) # then
            Q /= B                                 # column sums 1 / B
        Q *= B                                     # column sums 1
        return Q^T                                 # [B, K]

    so (for iters >= 1) each sample's assignment sums to 1, and the class shares
    mean_b Q[b, c] approach r_c / sum(r) as iters grows. Before the exponent each class's
    maximum of S / eps over the samples is subtracted (cancelled exactly by the first row
    normalisation; the released code omits it and overflows for scores above 88.7 * eps in
    float32). The assignment carries no gradient (released `@torch.no_grad`): the inputs are
    wrapped in `stop_gradient`.

    Args:
      scores: [B, K] sample-to-class scores (cosine similarities or normalised logits).
      prior: [K] class prior r (the released `class_distribution`, summing to 1).
      epsilon: the exponent's temperature (0.05 released).
      iters: Sinkhorn iterations, static (3 released).
      valid: optional bool [B]; samples marked False get zero mass and leave the sums, so the
        valid rows equal the Sinkhorn over the valid rows alone, with B = their count.

    Returns:
      [B, K] assignments in the compute dtype (float32, or float64 for float64 scores); rows of
      invalid samples are 0.
    """
    if jnp.ndim(scores) != 2 or jnp.shape(prior) != (jnp.shape(scores)[1],):
        raise ValueError(
            f"sinkhorn: scores must be [B, K] and prior [K], got {jnp.shape(scores)} and "
            f"{jnp.shape(prior)}"
        )
    dtype = _float_dtype(scores)
    s = jax.lax.stop_gradient(jnp.asarray(scores, dtype)) / epsilon
    r = jax.lax.stop_gradient(jnp.asarray(prior, dtype))
    if valid is None:
        keep = jnp.ones(s.shape[0], bool)
    else:
        keep = jnp.asarray(valid, bool)
    s = jnp.where(keep[:, None], s, -jnp.inf)
    # Each class's maximum over the samples is subtracted: `Q /= sum(Q)` and the first row
    # normalisation cancel a factor per class row exactly (with no iteration, only a global
    # factor cancels, so the global maximum is taken).
    top = jnp.max(s, axis=0, keepdims=True) if iters > 0 else jnp.max(s, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    q = jnp.exp(s - top).T  # [K, B]; 0 on invalid samples
    # The released B (at least 1, so that an all-masked call returns zeros, not NaN).
    num = jnp.maximum(jnp.sum(keep), 1).astype(dtype)
    q = q / _nonzero(jnp.sum(q))
    for _ in range(iters):
        q = q / _nonzero(jnp.sum(q, axis=1, keepdims=True))
        q = q * r[:, None]
        q = q / _nonzero(jnp.sum(q, axis=0, keepdims=True))
        q = q / num
    q = q * num
    return q.T


def _nonzero(x: jax.Array) -> jax.Array:
    # A zero sum only divides zeros (masked samples, an underflowed class): 0 / 1 = 0.
    return jnp.where(x > 0, x, jnp.ones_like(x))


# ------------------------------------------------------------------------------------------------
# Prototype scores and rectification [released: get_prototype_weight, step]


def prototype_scores(feats: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Cosine similarities of features to prototypes: normalize(f) . normalize(W)^T.

    Args:
      feats: [..., D] features (not necessarily normalised).
      prototypes: [K, D] the head W (not necessarily normalised).

    Returns:
      [..., K] in the compute dtype.
    """
    f = l2_normalize(feats)
    w = l2_normalize(prototypes)
    return jnp.einsum("...d,kd->...k", f, w.astype(f.dtype), precision=_HIGHEST)


def prototype_probabilities(
    feats: jax.Array, prototypes: jax.Array, temperature: float = TEMPERATURE
) -> jax.Array:
    """P_SL = softmax(cos(f, W) / T) over the last axis (`get_prototype_weight` after `full2weak`).

    Args:
      feats: [..., D] EMA features already mapped to the weak view.
      prototypes: [K, D] the EMA head W_ema.
      temperature: T (0.08 released).

    Returns:
      [..., K] probabilities.
    """
    return jax.nn.softmax(prototype_scores(feats, prototypes) / temperature, axis=-1)


def rectify(
    p_sl: jax.Array,
    p_st: jax.Array,
    threshold: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Rectified pseudo-labels argmax_c P_SL * P_ST, as the `--proto_rectify` block of `step`.

    Args:
      p_sl: [..., K] prototype probabilities (`prototype_probabilities`).
      p_st: [..., K] the warm-up model's soft pseudo-label, at the same resolution.
      threshold: the released `train_thred` (default 0: nothing is ignored); a pixel whose
        max_c r_c / sum_c r_c is below it (strictly) becomes `ignore_index`.
      ignore_index: the label given to such pixels.

    Returns:
      int32 [...] labels.
    """
    dtype = jnp.promote_types(_float_dtype(p_sl), _float_dtype(p_st))
    r = jnp.asarray(p_sl, dtype) * jnp.asarray(p_st, dtype)
    labels = jnp.argmax(r, axis=-1).astype(jnp.int32)
    # As released: the argmax is taken first, then r is normalised and thresholded. A zero sum
    # gives NaN there, which is never below the threshold (same here).
    confidence = jnp.max(r / jnp.sum(r, axis=-1, keepdims=True), axis=-1)
    return jnp.where(confidence < threshold, jnp.int32(ignore_index), labels)


# ------------------------------------------------------------------------------------------------
# L_CTS: CE and reverse CE [released: cross_entropy2d, CustomModel.rce]


def _labels_and_mask(
    labels: jax.Array, num_classes: int, ignore_index: int
) -> tuple[jax.Array, jax.Array]:
    labels = jnp.asarray(labels, jnp.int32)
    keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    return jnp.where(keep, labels, 0), keep


def rce_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Reverse cross-entropy, as `CustomModel.rce`.

        p = clamp(softmax(logits), 1e-7, 1);  t = clamp(onehot(y), 1e-4, 1)
        RCE = sum_pixels[kept] (-sum_c p_c log t_c) / (#kept + 1e-6)

    i.e. per kept pixel -log(1e-4) * sum_{c != y} max(p_c, 1e-7).

    Args:
      logits: [..., K] logits at the label resolution.
      labels: int [...]; `ignore_index` (and labels outside [0, K)) are not kept.
      ignore_index: the ignore label (250 in the released code, 255 here).

    Returns:
      scalar in the compute dtype; 0 when no pixel is kept.
    """
    dtype = _float_dtype(logits)
    num_classes = logits.shape[-1]
    safe, keep = _labels_and_mask(labels, num_classes, ignore_index)
    p = jnp.clip(jax.nn.softmax(jnp.asarray(logits, dtype), axis=-1), SOFTMAX_FLOOR, 1.0)
    onehot = jnp.clip(jax.nn.one_hot(safe, num_classes, dtype=dtype), ONE_HOT_FLOOR, 1.0)
    per_pixel = -jnp.sum(p * jnp.log(onehot), axis=-1)
    mask = keep.astype(dtype)
    return jnp.sum(per_pixel * mask) / (jnp.sum(mask) + 1e-6)


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
    """`F.cross_entropy(ignore_index=...)` with mean reduction: mean over kept pixels.

    Args:
      logits: [..., K] logits at the label resolution (the released `cross_entropy2d` raises on
        a size mismatch, so nothing is resized here).
      labels: int [...].
      ignore_index: the ignore label.

    Returns:
      scalar; 0 when no pixel is kept (torch: NaN).
    """
    dtype = _float_dtype(logits)
    safe, keep = _labels_and_mask(labels, logits.shape[-1], ignore_index)
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, dtype), axis=-1)
    onehot = jax.nn.one_hot(safe, logits.shape[-1], dtype=dtype)
    mask = keep.astype(dtype)
    nll = -jnp.sum(onehot * log_probs, axis=-1) * mask
    return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1.0)


def cts_loss(
    logits: jax.Array,
    labels: jax.Array,
    alpha: float = RCE_ALPHA,
    beta: float = RCE_BETA,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """L_CTS with `--rce`: alpha * CE + beta * RCE (0.1 and 1.0 released), same inputs for both.

    Args:
      logits: [..., K] student logits at the label resolution.
      labels: int [...] rectified pseudo-labels (with the CutMix box's source labels).
      alpha: `rce_alpha`, the CE weight.
      beta: `rce_beta`, the RCE weight.
      ignore_index: the ignore label.

    Returns:
      scalar.
    """
    ce = cross_entropy_loss(logits, labels, ignore_index)
    return alpha * ce + beta * rce_loss(logits, labels, ignore_index)


# ------------------------------------------------------------------------------------------------
# L_SL: self-labelling against Sinkhorn assignments [released: step]


def self_labelling_loss(
    scores: jax.Array,
    assign_scores: jax.Array,
    bank_scores: jax.Array | None,
    bank_valid: jax.Array | None,
    prior: jax.Array,
    temperature: float = TEMPERATURE,
    epsilon: float = EPSILON,
    iters: int = SINKHORN_ITERATIONS,
) -> jax.Array:
    """One released self-labelling term for one image.

        q = sinkhorn([bank_scores; assign_scores])[-N:]      (no gradient)
        L = -mean_n sum_c q[n, c] log softmax(scores[n] / T)_c

    Args:
      scores: [N, K] differentiable current scores (cos(f_ema, W) of the sampled pixels).
      assign_scores: [N, K] the current rows given to the Sinkhorn (the same scores for term 1,
        the L2-normalised EMA logits for term 2).
      bank_scores: [L, K] the memory bank's rows as scores, or None for no bank.
      bank_valid: bool [L] (or a scalar broadcast to [L]): which bank rows enter the Sinkhorn;
        the released rule is all of them once the bank is full, none before.
      prior: [K] the class prior.
      temperature: T of the prediction (0.08 released).
      epsilon: the Sinkhorn's eps (0.05 released).
      iters: Sinkhorn iterations (3 released).

    Returns:
      scalar loss in the compute dtype of `scores`.
    """
    dtype = _float_dtype(scores)
    num = scores.shape[0]
    current = jnp.asarray(assign_scores, dtype)
    if bank_scores is None:
        q = sinkhorn(current, prior, epsilon, iters)
    else:
        length = bank_scores.shape[0]
        bank_valid = jnp.broadcast_to(jnp.asarray(bank_valid, bool), (length,))
        rows = jnp.concatenate([jnp.asarray(bank_scores, dtype), current], axis=0)
        keep = jnp.concatenate([bank_valid, jnp.ones((num,), bool)])
        q = sinkhorn(rows, prior, epsilon, iters, valid=keep)[length:]
    log_p = jax.nn.log_softmax(jnp.asarray(scores, dtype) / temperature, axis=-1)
    return -jnp.mean(jnp.sum(jax.lax.stop_gradient(q) * log_p, axis=-1))


def cpsl_self_labelling_losses(
    ema_feats: jax.Array,
    ema_logits: jax.Array,
    prototypes: jax.Array,
    feat_bank: jax.Array,
    logit_bank: jax.Array,
    bank_valid: jax.Array,
    prior: jax.Array,
    temperature: float = TEMPERATURE,
    epsilon: float = EPSILON,
    iters: int = SINKHORN_ITERATIONS,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Both self-labelling terms of one image, and the rows it pushes into the two banks.

    Term 1: scores s = cos(f, W); Sinkhorn over [feat_bank . W^T (un-normalised W); s].
    Term 2: the same s; Sinkhorn over [logit_bank; normalize(ema_logits)]. The gradient reaches
    `prototypes` through s only (the EMA features are constants).

    Args:
      ema_feats: [N, D] the sampled EMA features (not yet normalised).
      ema_logits: [N, K] the EMA logits at the same pixels.
      prototypes: [K, D] the self-labelling head W.
      feat_bank: [L, D] L2-normalised EMA features of earlier images.
      logit_bank: [L, K] L2-normalised EMA logits of earlier images.
      bank_valid: bool [L] or scalar, for both banks (they fill in step).
      prior: [K] the class prior.
      temperature, epsilon, iters: as `self_labelling_loss`.

    Returns:
      (term1, term2, feat_rows [N, D], logit_rows [N, K]): the two losses and the normalised
      rows the released code pushes into the feature and logit queues after this image.
    """
    feat_rows = jax.lax.stop_gradient(l2_normalize(ema_feats))
    logit_rows = jax.lax.stop_gradient(l2_normalize(ema_logits))
    w = l2_normalize(prototypes)
    scores = jnp.einsum("nd,kd->nk", feat_rows, w.astype(feat_rows.dtype), precision=_HIGHEST)
    bank1 = jnp.einsum(
        "ld,kd->lk",
        jnp.asarray(feat_bank, feat_rows.dtype),
        jax.lax.stop_gradient(jnp.asarray(prototypes, feat_rows.dtype)),
        precision=_HIGHEST,
    )
    kw = dict(temperature=temperature, epsilon=epsilon, iters=iters)
    term1 = self_labelling_loss(scores, scores, bank1, bank_valid, prior, **kw)
    term2 = self_labelling_loss(scores, logit_rows, logit_bank, bank_valid, prior, **kw)
    return term1, term2, feat_rows, logit_rows


# ------------------------------------------------------------------------------------------------
# L_cons: prototype consistency between views [released: step, `proto_consistW` block]


def consistency_kl(
    teacher_scores: jax.Array,
    student_scores: jax.Array,
    valid: jax.Array,
    temperature: float = TEMPERATURE,
) -> jax.Array:
    """The released L_cons: KL(teacher || student) of prototype assignments, mean over elements.

        p = softmax(teacher / T)  (no gradient);  log q = log_softmax(student / T)
        L = sum_{pixels, c} m * p_c (log p_c - log q_c) / sum_{pixels, c} m

    with m the validity mask broadcast over classes: with a per-pixel mask this is
    (1 / K) sum_c KL_c averaged over the valid pixels, as released.

    Args:
      teacher_scores: [..., K] cos(f_ema, W_ema) on the weak view, already warped to the strong
        view (`label_strong_T`); any finite value where invalid (the release has 250 there).
      student_scores: [..., K] cos(f_student(strong), W_ema), differentiable.
      valid: bool [...] (per pixel) or [..., K] (per element, as the released
        `warped != 250`); False for the pixels the warp did not cover.
      temperature: T (0.08 released).

    Returns:
      scalar in the compute dtype; 0 when nothing is valid (released: NaN).
    """
    dtype = jnp.promote_types(_float_dtype(teacher_scores), _float_dtype(student_scores))
    teacher = jax.lax.stop_gradient(jnp.asarray(teacher_scores, dtype))
    student = jnp.asarray(student_scores, dtype)
    if teacher.shape != student.shape:
        raise ValueError(
            f"consistency_kl: teacher {teacher.shape} and student {student.shape} differ"
        )
    valid = jnp.asarray(valid, bool)
    if valid.ndim == student.ndim - 1:
        valid = valid[..., None]
    mask = jnp.broadcast_to(valid, student.shape)
    # Pixels with no valid class never reach the sum; zeroing their teacher keeps a non-finite
    # filler out of the (masked) products. Mixed pixels keep every score, as released.
    teacher = jnp.where(jnp.any(mask, axis=-1, keepdims=True), teacher, 0.0)
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    # p log p with p from exp(log p): 0 * finite where p underflows (torch's xlogy gives 0 too).
    kl = jnp.exp(log_p) * (log_p - log_q)
    count = jnp.sum(mask).astype(dtype)
    return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(count, 1.0)


# ------------------------------------------------------------------------------------------------
# Prototype initialisation and EMA [released: calc_prototype.py, train.py, step]


def class_means(
    feats: jax.Array,
    labels: jax.Array,
    num_classes: int,
    valid: jax.Array | None = None,
    per_image: bool = False,
    min_count: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Per-class mean features, with zero rows for the classes that are absent.

    per_image=False: the mean over all valid pixels of each class (pixel-pooled); a class with
    fewer than `min_count` pixels is absent.
    per_image=True (the released `calc_prototype.py` rule, with `min_count=10`): each image
    whose class has at least `min_count` valid pixels gives that class's mean over the image,
    and the class mean is the plain average of these per-image means (the released running
    mean, before its count cap of 3000 images); a class no image gives is absent.

    Args:
      feats: [B, ..., D] features (per_image) or [..., D].
      labels: int [B, ...] / [...] class ids (the argmax prediction in the release); ids
        outside [0, num_classes) are not counted.
      num_classes: K.
      valid: optional bool, same shape as `labels`; False pixels are not counted.
      per_image: average per-image means (True) or pool the pixels (False).
      min_count: the least pixel count for a class to count (per image when per_image).

    Returns:
      (means [K, D] in the compute dtype, zero for absent classes;
       counts int32 [K]: contributing pixels, or contributing images when per_image).
    """
    dtype = _float_dtype(feats)
    feats = jnp.asarray(feats, dtype)
    labels = jnp.asarray(labels, jnp.int32)
    if feats.shape[:-1] != labels.shape:
        raise ValueError(f"class_means: feats {feats.shape} do not match labels {labels.shape}")
    keep = (labels >= 0) & (labels < num_classes)
    if valid is not None:
        keep = keep & jnp.asarray(valid, bool)
    onehot = jax.nn.one_hot(jnp.where(keep, labels, 0), num_classes, dtype=dtype)
    onehot = onehot * keep[..., None].astype(dtype)
    batch = feats.shape[0] if per_image else 1
    onehot = onehot.reshape(batch, -1, num_classes)  # [B, P, K]
    flat = feats.reshape(batch, -1, feats.shape[-1])  # [B, P, D]
    sums = jnp.einsum("bpk,bpd->bkd", onehot, flat, precision=_HIGHEST)
    pixels = jnp.sum(onehot, axis=1)  # [B, K]
    present = pixels >= max(min_count, 1)
    if not per_image:
        sums, pixels, present = sums[0], pixels[0], present[0]
        means = sums / jnp.where(present, pixels, 1.0)[:, None]
        counts = jnp.where(present, pixels, 0.0).astype(jnp.int32)
        return jnp.where(present[:, None], means, 0.0), counts
    image_means = sums / jnp.where(present, pixels, 1.0)[..., None]  # [B, K, D]
    images = jnp.sum(present, axis=0)  # [K]
    total = jnp.sum(jnp.where(present[..., None], image_means, 0.0), axis=0)
    means = total / jnp.maximum(images, 1).astype(dtype)[:, None]
    return means, images.astype(jnp.int32)


def initial_prototypes(
    feats: jax.Array,
    labels: jax.Array,
    num_classes: int,
    valid: jax.Array | None = None,
    per_image: bool = True,
    min_count: int = PROTOTYPE_MIN_PIXELS,
) -> jax.Array:
    """W = W_ema = F.normalize(class means), as `train.py` initialises them from the centroids.

    Args:
      feats, labels, num_classes, valid, per_image, min_count: as `class_means` (the defaults
        are the released `calc_prototype.py` rule).

    Returns:
      [K, D] unit rows; zero rows for absent classes (the released zero centroid normalised).
    """
    means, _ = class_means(feats, labels, num_classes, valid, per_image, min_count)
    return l2_normalize(means)


def ema_update(old, new, momentum: float = EMA_MOMENTUM):
    """The released EMA: old * m + new * (1 - m), leaf by leaf, with no normalisation after.

    Args:
      old: array or pytree (W_ema [K, D], or the EMA model's parameters).
      new: same structure (W after the SGD step).
      momentum: m (0.999 released, for W_ema and the EMA model alike).

    Returns:
      the updated tree, without gradient (the release assigns `.data`).
    """
    return jax.tree.map(
        lambda o, n: jax.lax.stop_gradient(o * momentum + n * (1.0 - momentum)), old, new
    )


def prior_ema(
    prior: jax.Array,
    predicted_labels: jax.Array,
    valid: jax.Array | None,
    num_classes: int,
    momentum: float,
) -> jax.Array:
    """[reconstructed] The running class prior: r <- m r + (1 - m) shares of the predictions.

    shares_c = #(valid pixels predicted c) / #(valid pixels); a step with no valid pixel leaves
    r unchanged. A prior that sums to 1 keeps summing to 1.

    Args:
      prior: [K] the current prior r.
      predicted_labels: int [...] the teacher's argmax predictions; ids outside
        [0, num_classes) are not counted.
      valid: optional bool [...] (e.g. pixels inside the image); None counts every pixel.
      num_classes: K.
      momentum: m, the weight of the old prior.

    Returns:
      [K] the new prior, without gradient.
    """
    dtype = _float_dtype(prior)
    prior = jax.lax.stop_gradient(jnp.asarray(prior, dtype))
    labels = jnp.asarray(predicted_labels, jnp.int32)
    keep = (labels >= 0) & (labels < num_classes)
    if valid is not None:
        keep = keep & jnp.asarray(valid, bool)
    onehot = jax.nn.one_hot(jnp.where(keep, labels, 0), num_classes, dtype=dtype)
    counts = jnp.sum(onehot * keep[..., None].astype(dtype), axis=tuple(range(labels.ndim)))
    total = jnp.sum(counts)
    shares = counts / jnp.maximum(total, 1.0)
    updated = prior * momentum + shares * (1.0 - momentum)
    return jnp.where(total > 0, updated, prior)


# ------------------------------------------------------------------------------------------------
# Bank contrast [released: CustomModel.contrastive]


def bank_contrast(
    feats: jax.Array,
    labels: jax.Array,
    bank: jax.Array,
    bank_labels: jax.Array,
    temperature: float = TEMPERATURE,
    valid: jax.Array | None = None,
    bank_valid: jax.Array | None = None,
) -> jax.Array:
    """The released contrast of one image's anchors against the feature queue.

        s_ij = f_i . b_j / T;  P(i) = {j: y_i == y_j},  N(i) = the rest
        l_i = -sum_{j in P(i)} [s_ij - log(exp(s_ij) + sum_{n in N(i)} exp(s_in))]
              / (|P(i)| + 1e-5)
        L = mean over anchors of l_i

    Args:
      feats: [N, D] anchors (the released L2-normalised student features; the gradient flows
        here).
      labels: int [N] the anchors' labels (compared by value, ignore labels included).
      bank: [L, D] the queue rows (constants).
      bank_labels: int [L] the queue's labels.
      temperature: T (the released `opt.temperature`, 0.08).
      valid: optional bool [N]; the mean runs over the valid anchors (released: all).
      bank_valid: optional bool [L]; invalid rows are neither positives nor negatives
        (released: the loss runs only once the queue is full).

    Returns:
      scalar; 0 when no anchor is valid. The released batch loss is the mean over images.
    """
    dtype = _float_dtype(feats)
    feats = jnp.asarray(feats, dtype)
    bank = jax.lax.stop_gradient(jnp.asarray(bank, dtype))
    num, length = feats.shape[0], bank.shape[0]
    ok = jnp.ones(num, bool) if valid is None else jnp.asarray(valid, bool)
    bank_ok = jnp.ones(length, bool) if bank_valid is None else jnp.asarray(bank_valid, bool)
    logits = jnp.matmul(feats, bank.T, precision=_HIGHEST) / temperature  # [N, L]
    logits = jnp.where(bank_ok[None, :], logits, 0.0)  # no inf * 0 in the masked gradient
    same = jnp.asarray(labels, jnp.int32)[:, None] == jnp.asarray(bank_labels, jnp.int32)[None, :]
    pos = same & bank_ok[None, :]
    neg = ~same & bank_ok[None, :]
    # The released detached row maximum; it cancels in log_prob and keeps exp() in range.
    top = jnp.max(jnp.where(bank_ok[None, :], logits, -jnp.inf), axis=1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    shifted = logits - top
    exp = jnp.exp(jnp.where(bank_ok[None, :], shifted, -jnp.inf))
    neg_sum = jnp.sum(jnp.where(neg, exp, 0.0), axis=1, keepdims=True)
    # Entries that are not positives are dropped below; a 1 in their log keeps 1 / 0 out of the
    # gradient.
    log_prob = shifted - jnp.log(jnp.where(pos, exp + neg_sum, 1.0))
    num_pos = jnp.sum(pos, axis=1).astype(dtype)
    per_anchor = -jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / (num_pos + CONTRAST_EPS)
    count = jnp.sum(ok).astype(dtype)
    return jnp.sum(jnp.where(ok, per_anchor, 0.0)) / jnp.maximum(count, 1.0)
