"""PiPa's pixel-wise contrast: hard-anchor sampling and the supervised contrast, fixed shapes.

Source [released]: PiPa (Chen et al., ACM MM 2023), `chen742/PiPa`,
`PiPa_DAFormer/mmseg/models/decode_heads/decode_head.py: PixelContrastLoss`
(`_hard_anchor_sampling`, `_contrastive`; the same class is copied in the HRDA variant's
`hrda_head.py`). The released `forward` resizes the labels to the embedding size
(nearest), flattens NCHW to [B, N, D] and calls `_hard_anchor_sampling(feats, labels, predict)`,
so the sampler's `y_hat` is the label map and its `y` the argmax prediction. Those two steps are
the caller's here: the functions take embeddings, labels and predictions already at [B, N].

Sampling rule [released], per image b and anchor class c:

* c is an anchor class of image b when more than `max_views` pixels of b carry label c (the
  released threshold is `max_views` itself, 100). The released `ignore_label` is -1, which no
  label takes, so the ignore label 255 is NOT excluded and becomes an anchor "class" of its own
  wherever it covers more than `max_views` pixels; `exclude_ignore=True` leaves it out instead.
* `n_view = min(max_samples // T, max_views)` with T the number of anchor classes summed over the
  batch.
* hard pixels: label c and prediction != c; easy: label c and prediction c. With h, e their
  counts: both `>= n_view / 2` -> `n_view // 2` hard and the rest easy; only the hard side ->
  all e easy and `n_view - e` hard; otherwise all h hard and `n_view - h` easy. (The release's
  last branch, both short, cannot be reached: h + e > max_views >= n_view.)
* the views of an anchor are its hard picks, then its easy picks; anchors are ordered image by
  image, classes ascending (the ignore label, 255, last), as `torch.unique` orders them.

[fixed shape] Every image has one anchor slot per candidate class: the classes 0..C-1 and,
unless `exclude_ignore`, the ignore label, so K = C (+ 1) slots and B * K anchors; each has
`min(max_views, max_samples)` view slots, of which the first `n_view` are valid for an anchor
class and none for the other slots. Labels outside [0, C) other than the ignore label are no
anchor class (the release would take any label value). Unused slots hold zeros.

[reconstructed] Random choice. The release draws `perm = torch.randperm(num_hard)` and keeps
`hard_indices[perm[:num_hard_keep]]` (then the same for the easy pixels with a second draw):
a uniformly random ordered selection of `num_hard_keep` of the hard pixels. Here each image
draws one uniform random permutation of its N pixels (`draw_pixel_ranks`: one
`jax.random.permutation` per image, from `jax.random.split(rng, B)`), read as a rank per pixel;
an anchor's hard views are its hard pixels of lowest rank, in increasing rank, and its easy
views likewise. The restrictions of one uniform permutation to disjoint pixel sets (the hard and
the easy pixels of each class) are independent uniform orderings, so the picks have exactly the
distribution of the released independent `randperm` draws; only the random stream differs.
Given the ranks r, the equivalent released draw for a pixel set S (listed in increasing pixel
index, as `nonzero()` lists it) is `perm = argsort(r[S])`.

Loss [released: `_contrastive`], over the R = A * n_view samples (anchor, view), each both an
anchor and a contrast sample (rows ordered view-major, as `torch.cat(torch.unbind(feats_, 1))`):
  l_i = -(tau / tau_base) * (1 / |P(i)|) * sum_{p in P(i)} [s_ip / tau
        - log(exp(s_ip / tau) + sum_{n in N(i)} exp(s_in / tau))],
s the dot products, P(i) the other samples of i's label (self excluded), N(i) the samples of
other labels; each positive has its own denominator (itself plus all negatives), not the SupCon
softmax over all samples. The loss is the mean of l_i. Samples of the same label are positives
across images too. tau = 0.1, tau_base = 0.07.

[fixed shape] A validity mask over (anchor, view) removes padded samples from every anchor
set, positive set and negative set, and from the mean; the mean is over valid samples only. A
valid sample without any positive gives NaN (0 / 0), as in the release; the sampler never makes
one when `n_view >= 2`. No valid sample gives 0 with a zero gradient, where the release fails
(`_hard_anchor_sampling` returns None when no class qualifies; `n_view == 0` gives the mean of
an empty tensor, NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from data_pipelines.labels import IGNORE_INDEX


def _float_dtype(x: jax.Array) -> jnp.dtype:
    # At least float32 (bf16 features are promoted); float64 stays float64 (gradient checks).
    return jnp.promote_types(x.dtype, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Hard-anchor sampling [released: `_hard_anchor_sampling`]


def anchor_class_ids(
    num_classes: int, ignore_index: int = IGNORE_INDEX, exclude_ignore: bool = False
) -> jax.Array:
    """The candidate class of each anchor slot of an image: 0..C-1, then the ignore label.

    Args:
      num_classes: C.
      ignore_index: the ignore label; a candidate class unless `exclude_ignore` (the release).
      exclude_ignore: leave the ignore label out.

    Returns:
      int32 [K], K = C, or C + 1 with the ignore label last.
    """
    ids = jnp.arange(num_classes, dtype=jnp.int32)
    if exclude_ignore:
        return ids
    return jnp.concatenate([ids, jnp.array([ignore_index], jnp.int32)])


def draw_pixel_ranks(rng: jax.Array, batch_size: int, num_pixels: int) -> jax.Array:
    """A uniform random permutation of the pixel indices per image, read as pixel ranks.

    Args:
      rng: PRNG key.
      batch_size: B.
      num_pixels: N.

    Returns:
      int32 [B, N]; each row holds 0..N-1 once.
    """
    keys = jax.random.split(rng, batch_size)
    ranks = jax.vmap(lambda k: jax.random.permutation(k, num_pixels))(keys)
    return ranks.astype(jnp.int32)


def select_anchors(
    feats: jax.Array,
    labels: jax.Array,
    predict: jax.Array,
    ranks: jax.Array,
    *,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    max_samples: int = 1024,
    max_views: int = 100,
    exclude_ignore: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hard-anchor sampling with explicit pixel ranks (the random choice as an input).

    The released rule (module docstring) at fixed shapes: image b's anchor slot k holds class
    `anchor_class_ids(...)[k]`; its valid views are the hard pixels of lowest rank, then the
    easy pixels of lowest rank, as many of each as the released rule keeps.

    Args:
      feats: [B, N, D] per-pixel embeddings (the gradient flows through the picks).
      labels: int [B, N] label map at the embedding size (the release's `y_hat`).
      predict: int [B, N] predicted classes (the release's `y`).
      ranks: int [B, N]; each row a permutation of 0..N-1 (`draw_pixel_ranks`).
      num_classes: C.
      ignore_index: the ignore label, not in [0, C).
      max_samples: the release's `max_samples` (1024).
      max_views: the release's `max_views` (100): the view cap and the pixel-count threshold.
      exclude_ignore: False as released (the ignore label can be an anchor class).

    Returns:
      (anchor_feats [B * K, V, D], anchor_labels int32 [B * K], valid bool [B * K, V]) with
      K = C (+ 1 unless exclude_ignore) and V = min(max_views, max_samples); invalid entries of
      anchor_feats are 0.
    """
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} must lie outside [0, {num_classes})")
    feats = jnp.asarray(feats)
    labels = jnp.asarray(labels, jnp.int32)
    predict = jnp.asarray(predict, jnp.int32)
    ranks = jnp.asarray(ranks, jnp.int32)
    batch, num_pixels, _ = feats.shape
    if labels.shape != (batch, num_pixels) or predict.shape != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and predict {tuple(predict.shape)} must be "
            f"[B, N] = {(batch, num_pixels)}"
        )
    if ranks.shape != labels.shape:
        raise ValueError(f"ranks {tuple(ranks.shape)} must be [B, N] = {(batch, num_pixels)}")
    class_ids = anchor_class_ids(num_classes, ignore_index, exclude_ignore)
    k_slots = class_ids.shape[0]
    v_slots = min(max_views, max_samples)

    # Pixel -> anchor slot (K: none); group 2k = hard pixels of slot k, 2k + 1 = easy ones.
    in_range = (labels >= 0) & (labels < num_classes)
    is_ignore = (labels == ignore_index) & (not exclude_ignore)
    slot = jnp.where(in_range, labels, jnp.where(is_ignore, num_classes, k_slots))
    group = 2 * slot + (predict == labels).astype(jnp.int32)  # [B, N], 2K = no anchor class
    counts = jax.vmap(lambda g: jnp.bincount(g, length=2 * k_slots + 2))(group)
    num_hard = counts[:, 0 : 2 * k_slots : 2]  # [B, K]
    num_easy = counts[:, 1 : 2 * k_slots : 2]  # [B, K]
    is_anchor = num_hard + num_easy > max_views  # [B, K]; the release's `> self.max_views`
    total = jnp.sum(is_anchor)
    n_view = jnp.minimum(max_samples // jnp.maximum(total, 1), max_views)

    # The released split; `num >= n_view / 2` in integers is `2 * num >= n_view`.
    hard_enough = 2 * num_hard >= n_view
    easy_enough = 2 * num_easy >= n_view
    hard_keep = jnp.where(
        hard_enough & easy_enough,
        n_view // 2,
        jnp.where(hard_enough, n_view - num_easy, num_hard),
    )  # [B, K]; the easy side keeps n_view - hard_keep

    # Sort each image's pixels by (group, rank): every group's pixels are contiguous, in
    # increasing rank, the hard group of a slot just before its easy group.
    order = jnp.argsort(group * num_pixels + ranks, axis=1)  # [B, N] pixel indices
    start = jnp.cumsum(counts, axis=1) - counts  # [B, 2K + 2] first sorted position per group
    view = jnp.arange(v_slots)[None, None, :]  # [1, 1, V]
    is_hard_view = view < hard_keep[..., None]
    position = jnp.where(
        is_hard_view,
        start[:, 0 : 2 * k_slots : 2, None] + view,
        start[:, 1 : 2 * k_slots : 2, None] + view - hard_keep[..., None],
    )  # [B, K, V]
    valid = is_anchor[..., None] & (view < n_view)
    position = jnp.where(valid, position, 0).reshape(batch, -1)
    pixel = jnp.take_along_axis(order, position, axis=1)  # [B, K * V]
    picked = jnp.take_along_axis(feats, pixel[..., None], axis=1)  # [B, K * V, D]
    picked = picked.reshape(batch * k_slots, v_slots, -1)
    valid = valid.reshape(batch * k_slots, v_slots)
    anchor_feats = jnp.where(valid[..., None], picked, jnp.zeros((), picked.dtype))
    anchor_labels = jnp.tile(class_ids, batch)
    return anchor_feats, anchor_labels, valid


def hard_anchor_sampling(
    rng: jax.Array,
    feats: jax.Array,
    labels: jax.Array,
    predict: jax.Array,
    *,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    max_samples: int = 1024,
    max_views: int = 100,
    exclude_ignore: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The released `_hard_anchor_sampling` at fixed shapes, drawing its picks from `rng`.

    `select_anchors` with `draw_pixel_ranks(rng, B, N)`: the same distribution as the released
    `torch.randperm` draws, from another random stream (module docstring).

    Args:
      rng: PRNG key.
      feats: [B, N, D] per-pixel embeddings.
      labels: int [B, N] label map at the embedding size (the release's `y_hat`).
      predict: int [B, N] predicted classes (the release's `y`).
      num_classes, ignore_index, max_samples, max_views, exclude_ignore: as `select_anchors`.

    Returns:
      (anchor_feats [B * K, V, D], anchor_labels int32 [B * K], valid bool [B * K, V]), as
      `select_anchors`.
    """
    batch, num_pixels = jnp.shape(labels)
    ranks = draw_pixel_ranks(rng, batch, num_pixels)
    return select_anchors(
        feats,
        labels,
        predict,
        ranks,
        num_classes=num_classes,
        ignore_index=ignore_index,
        max_samples=max_samples,
        max_views=max_views,
        exclude_ignore=exclude_ignore,
    )


# ------------------------------------------------------------------------------------------------
# The contrast [released: `_contrastive`]


def pixel_contrastive(
    anchor_feats: jax.Array,
    anchor_labels: jax.Array,
    valid: jax.Array,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> jax.Array:
    """PiPa's pixel contrast on explicit anchors, each positive with its own denominator.

    l_i = -(temperature / base_temperature) * mean_{p in P(i)} [s_ip / temperature
          - log(exp(s_ip / temperature) + sum_{n in N(i)} exp(s_in / temperature))]
    over the valid samples (anchor, view), averaged over them (module docstring).

    Args:
      anchor_feats: [A, V, D] embeddings (unit-norm in PiPa; the gradient flows here).
      anchor_labels: int [A] the anchors' classes.
      valid: bool or float [A, V] (or [A], every view of an anchor); nonzero = valid.
      temperature: divides the similarities (0.1 released).
      base_temperature: the loss is scaled by temperature / base_temperature (0.07 released).

    Returns:
      float scalar; 0 when no sample is valid; NaN when a valid sample has no positive.
    """
    anchor_feats = jnp.asarray(anchor_feats)
    num_anchors, num_views, dim = anchor_feats.shape
    valid = jnp.asarray(valid) != 0
    if valid.shape == (num_anchors,):
        valid = jnp.broadcast_to(valid[:, None], (num_anchors, num_views))
    if valid.shape != (num_anchors, num_views):
        raise ValueError(
            f"valid {tuple(valid.shape)} must be [A, V] or [A] for {(num_anchors, num_views)}"
        )
    dtype = _float_dtype(anchor_feats)
    # Rows view-major, as torch.cat(torch.unbind(feats_, dim=1), dim=0).
    z = jnp.swapaxes(anchor_feats, 0, 1).reshape(-1, dim).astype(dtype)  # [R, D]
    ok = jnp.swapaxes(valid, 0, 1).reshape(-1)  # [R]
    labels = jnp.tile(jnp.asarray(anchor_labels, jnp.int32), num_views)  # [R]
    z = jnp.where(ok[:, None], z, 0.0)

    logits = jnp.matmul(z, z.T) / temperature  # [R, R]
    same = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(z.shape[0], dtype=bool)
    pos = same & not_self & ok[None, :]
    neg = ~same & ok[None, :]
    # The release subtracts the detached row maximum (self included); it cancels in log_prob
    # and keeps exp() in range.
    top = jnp.max(jnp.where(ok[None, :], logits, -jnp.inf), axis=1)
    top = jax.lax.stop_gradient(jnp.where(jnp.any(ok), top, 0.0))
    shifted = logits - top[:, None]
    neg_sum = jnp.sum(jnp.where(neg, jnp.exp(jnp.where(neg, shifted, 0.0)), 0.0), axis=1)
    s_pos = jnp.where(pos, shifted, 0.0)  # masked entries stay finite (no inf * 0 gradient)
    log_prob = s_pos - jnp.log(jnp.exp(s_pos) + neg_sum[:, None])  # [R, R]
    num_pos = jnp.sum(pos, axis=1).astype(dtype)
    # 0 / 0 = NaN for a valid sample without positives, as released; padded rows divide by 1.
    mean_log_prob_pos = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / jnp.where(ok, num_pos, 1.0)
    per_sample = -(temperature / base_temperature) * mean_log_prob_pos
    count = jnp.sum(ok).astype(dtype)
    return jnp.sum(jnp.where(ok, per_sample, 0.0)) / jnp.maximum(count, 1.0)
