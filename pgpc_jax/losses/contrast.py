"""Pixel contrast losses on encoder features: `cluda` (released lineage) and `pgpc` (reconstructed).

Sources (`docs/pgpc_spec.md` gives the equations, defaults and sources; `docs/method.md`):

* [released] The embedding (`embed_features`, `labels_to_grid`, `values_to_grid`) is PGPC's
  `dacs.py`: the four encoder stages resized bilinearly (align_corners=False) to stride 4,
  concatenated, then resized bilinearly with align_corners=True to a 65x65 grid; labels reach the
  grid by PyTorch's legacy nearest rule, pixel weights bilinearly with align_corners=True.
* [released] `cluda_loss` is CLUDA's `contrastive_loss` (`mmseg/models/losses/contrastive_loss.py`),
  which the released PGPC training step calls, number for number, including its flattening-order
  quirk behind `order_quirk`.
* [reconstructed] `pgpc_loss` (with `init_prototypes`, `update_prototypes` and the fixed-size
  samplers) is this project's completion of the paper's description (variant `pgpc` of
  `docs/pgpc_spec.md`): reliable anchors pulled to EMA class prototypes and pushed from reliable
  pixels of other classes and from unreliable target pixels whose teacher top-K rules the
  anchor's class out. Every number in it is a keyword argument (a config field).

Everything is jit-friendly: static shapes, fixed-size sampling with validity masks (top-k of
random priorities) instead of boolean indexing, and sampling that depends only on the rng and
global arrays, so a batch sharded over devices gives the single-device result.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.labels import IGNORE_INDEX
from pgpc_jax.models.layers import resize_bilinear, resize_nearest_legacy

# torch.nn.functional.normalize's default eps.
_NORMALIZE_EPS = 1e-12


def _float_dtype(x: jax.Array) -> jnp.dtype:
    # Compute in at least float32 (bf16 features are promoted); float64 stays float64 (grad checks).
    return jnp.promote_types(x.dtype, jnp.float32)


def l2_normalize(x: jax.Array, eps: float = _NORMALIZE_EPS) -> jax.Array:
    """`F.normalize(x, dim=-1)`: x / max(||x||, eps), with a finite gradient at x = 0.

    max(sqrt(s), eps) is written sqrt(max(s, eps^2)), which has the same value and no NaN
    gradient where the norm is 0 (the sqrt is never taken of 0).
    """
    x = x.astype(_float_dtype(x))
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


# ------------------------------------------------------------------------------------------------
# Embedding on the contrast grid [released]


def embed_features(feats: Sequence[jax.Array], grid: Sequence[int] = (65, 65)) -> jax.Array:
    """PGPC's contrast embedding: the encoder stages fused at stride 4, then sampled on `grid`.

    As `DACS.transform_inputs` + `F.interpolate(..., size=fm_size, align_corners=True)` of the
    released `dacs.py`; no projection head.

    Args:
      feats: the encoder stage outputs, [B, h_i, w_i, C_i] each (strides 4/8/16/32).
      grid: (gh, gw), the contrast grid (65x65 in the released code).

    Returns:
      [B, gh, gw, sum_i C_i], channels in stage order.
    """
    size = feats[0].shape[1:3]
    fused = jnp.concatenate(
        [resize_bilinear(f, size, align_corners=False) for f in feats], axis=-1
    )  # [B, h_0, w_0, sum C]
    return resize_bilinear(fused, grid, align_corners=True)


def labels_to_grid(labels: jax.Array, grid: Sequence[int] = (65, 65)) -> jax.Array:
    """Labels [B, H, W] to [B, gh, gw] by PyTorch's legacy nearest rule, src = floor(i * in / out)."""
    return resize_nearest_legacy(labels, grid)


def _cell_membership(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] 0/1: input index k belongs to grid cell i iff floor(i*in/out) <= k < the next
    cell's start (at least the start pixel itself when the grid is finer than the input)."""
    start = np.floor(np.arange(out_size + 1) * in_size / out_size).astype(np.int64)
    member = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        member[i, start[i] : max(start[i + 1], start[i] + 1)] = 1.0
    return member


def majority_labels_to_grid(
    labels: jax.Array,
    grid: Sequence[int] = (65, 65),
    *,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    """Labels [B, H, W] to [B, gh, gw] by majority vote over each cell's pixels [option].

    Cell i covers input rows floor(i*H/gh) .. floor((i+1)*H/gh) - 1 (likewise columns), the
    pixels whose nearest-rule cell it is. The ignore label votes like a class (a cell mostly
    void stays void); ties go to the lower class id. An alternative to `labels_to_grid`, which
    keeps one pixel per cell as the released code does.
    """
    height, width = labels.shape[1:3]
    rows = jnp.asarray(_cell_membership(int(grid[0]), height))
    cols = jnp.asarray(_cell_membership(int(grid[1]), width))
    labels = jnp.asarray(labels, jnp.int32)
    known = (labels >= 0) & (labels < num_classes)
    votes_for = jnp.where(known, labels, num_classes)  # everything else votes "ignore"
    onehot = jax.nn.one_hot(votes_for, num_classes + 1, dtype=jnp.float32)
    counts = jnp.einsum("ih,bhwc,jw->bijc", rows, onehot, cols, precision=jax.lax.Precision.HIGHEST)
    winner = jnp.argmax(counts, axis=-1).astype(jnp.int32)
    return jnp.where(winner == num_classes, ignore_index, winner)


def values_to_grid(x: jax.Array, grid: Sequence[int] = (65, 65)) -> jax.Array:
    """Pixel values [B, H, W] (e.g. weights) to [B, gh, gw], bilinear with align_corners=True."""
    return resize_bilinear(x[..., None], grid, align_corners=True)[..., 0]


# ------------------------------------------------------------------------------------------------
# CLUDA's pixel-to-pixel loss [released]


def cluda_loss(
    feats: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None = None,
    *,
    order_quirk: bool = False,
    temperature: float = 1.0,
    base_temperature: float = 1.0,
) -> jax.Array:
    """CLUDA's `contrastive_loss` on all grid pixels of the batch [released].

    With z the L2-normalised features of the N = B*h*w pixels and s_ij = z_i . z_j:
    logits l_ij = s_ij - max_k s_ik (the max is detached; the logits are NOT divided by the
    temperature, as in the reference), positives P_ij = [y_i = y_j][i != j], negatives
    [y_i != y_j], log p_ij = l_ij - log(exp(l_ij) + sum_{k neg} exp(l_ik)) (per-positive InfoNCE:
    other positives are not in the denominator), optionally multiplied by w_i * w_j, and

        L = -(temperature / base_temperature) * mean_i [ sum_j P_ij log p_ij / max(1, sum_j P_ij) ],

    the mean over ALL N anchors (those without a positive contribute 0). The ignore label is not
    excluded: 255 is one more class, as in the reference.

    Args:
      feats: [B, h, w, C] features (any float dtype; computed in at least float32).
      labels: int [B, h, w].
      weights: float [B, h, w] pixel weights (the mixed images' pseudo weights), or None.
      order_quirk: reproduce the reference's flattening for B > 1: features pixel-major
        (`torch.cat(torch.unbind(f, 1), 0)`), labels and weights batch-major (`view(-1)`), so a
        feature meets another pixel's label. False pairs every feature with its own label.
      temperature: only scales the loss, as in the reference.
      base_temperature: the reference's base temperature.

    Returns:
      float scalar.
    """
    batch, height, width, channels = feats.shape
    n = batch * height * width
    z = l2_normalize(feats.reshape(batch, height * width, channels))
    if order_quirk:
        z = z.transpose(1, 0, 2)  # row p * B + b holds image b, pixel p
    z = z.reshape(n, channels)
    y = labels.reshape(n)

    sim = jnp.matmul(z, z.T)  # [N, N]
    logits = sim - jax.lax.stop_gradient(jnp.max(sim, axis=1, keepdims=True))
    same = y[:, None] == y[None, :]
    exp_logits = jnp.exp(logits)
    neg_sum = jnp.sum(jnp.where(same, 0.0, exp_logits), axis=1, keepdims=True)
    log_prob = logits - jnp.log(exp_logits + neg_sum)
    if weights is not None:
        w = weights.reshape(n).astype(z.dtype)
        log_prob = log_prob * (w[:, None] * w[None, :])
    idx = jnp.arange(n)
    pos = same & (idx[:, None] != idx[None, :])
    den = jnp.maximum(jnp.sum(pos, axis=1), 1).astype(z.dtype)
    mean_log_prob_pos = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / den
    return -(temperature / base_temperature) * jnp.mean(mean_log_prob_pos)


# ------------------------------------------------------------------------------------------------
# Prototypes and fixed-size sampling [reconstructed]


def init_prototypes(num_classes: int, dim: int) -> dict[str, jax.Array]:
    """Empty class prototypes: {'mean': float32 [C, D] zeros, 'seen': bool [C] False}."""
    return {
        "mean": jnp.zeros((num_classes, dim), jnp.float32),
        "seen": jnp.zeros((num_classes,), jnp.bool_),
    }


def update_prototypes(
    protos: dict[str, jax.Array],
    z: jax.Array,
    labels: jax.Array,
    reliable: jax.Array,
    momentum: float,
) -> dict[str, jax.Array]:
    """EMA update of the class centroids of reliable pixel embeddings [reconstructed].

    For each class c present among the reliable pixels, m_c = the batch mean of its embeddings;
    mean_c <- momentum * mean_c + (1 - momentum) * m_c if c was seen before, else m_c. Absent
    classes keep their mean. Segment sums are one-hot matrix products (static shapes).

    Args:
      protos: {'mean': [C, D], 'seen': bool [C]}.
      z: [N, D] L2-normalised embeddings (the gradient is stopped here).
      labels: int [N]; labels outside [0, C) (e.g. 255) never count.
      reliable: bool [N], the pixels that may update the prototypes.
      momentum: weight of the old mean.

    Returns:
      the new prototypes, same dtypes.
    """
    mean, seen = protos["mean"], protos["seen"]
    num_classes = mean.shape[0]
    z = jax.lax.stop_gradient(z)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=z.dtype) * reliable[:, None]  # [N, C]
    counts = jnp.sum(onehot, axis=0)  # [C]
    sums = jnp.einsum("nc,nd->cd", onehot, z, precision=jax.lax.Precision.HIGHEST)
    present = counts > 0
    batch_mean = sums / jnp.maximum(counts, 1.0)[:, None]
    ema = momentum * mean + (1.0 - momentum) * batch_mean
    new_mean = jnp.where(present[:, None], jnp.where(seen[:, None], ema, batch_mean), mean)
    return {"mean": new_mean.astype(mean.dtype), "seen": seen | present}


def sample_uniform(rng: jax.Array, eligible: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Up to `k` eligible indices, uniformly without replacement, as a fixed-size sample.

    Args:
      rng: PRNG key.
      eligible: bool [N].
      k: sample size (clipped to N).

    Returns:
      (indices int32 [k'], valid bool [k']) with k' = min(k, N); invalid slots point anywhere.
    """
    k = min(k, eligible.shape[0])
    u = jax.random.uniform(rng, eligible.shape)
    priority = jnp.where(eligible, u, jnp.inf)
    neg_top, idx = jax.lax.top_k(-priority, k)
    return idx.astype(jnp.int32), jnp.isfinite(neg_top)


def sample_class_balanced(
    rng: jax.Array, labels: jax.Array, eligible: jax.Array, k: int, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Up to `k` eligible indices, round-robin over classes, as a fixed-size sample.

    Each eligible pixel gets priority rank + u, with u ~ U(0, 1) and rank its position within its
    class in the order of u; the k smallest priorities are taken. So every class gives its r-th
    pixel before any class gives its (r+1)-th: as balanced as the class counts allow.

    Args:
      rng: PRNG key.
      labels: int [N]; eligible pixels must have labels in [0, num_classes).
      eligible: bool [N].
      k: sample size (clipped to N).
      num_classes: number of classes.

    Returns:
      (indices int32 [k'], valid bool [k']) with k' = min(k, N).
    """
    n = eligible.shape[0]
    k = min(k, n)
    u = jax.random.uniform(rng, (n,))
    group = jnp.where(eligible, labels, num_classes).astype(jnp.int32)  # ineligible: last group
    group_s, u_s, perm = jax.lax.sort((group, u, jnp.arange(n, dtype=jnp.int32)), num_keys=2)
    counts = jnp.bincount(group, length=num_classes + 1)
    start = jnp.cumsum(counts) - counts  # first sorted position of each group
    rank = jnp.arange(n) - start[group_s]
    priority = jnp.where(group_s < num_classes, rank + u_s, jnp.inf)
    neg_top, pos = jax.lax.top_k(-priority, k)
    return perm[pos], jnp.isfinite(neg_top)


# ------------------------------------------------------------------------------------------------
# The PGPC loss [reconstructed]


def _masked_logsumexp(s: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise log sum_{mask} exp(s) over the last axis, with masked terms exactly excluded.

    Returns (lse, any): lse is finite everywhere (0 on rows with nothing in the mask, to be
    masked by the caller with `any`). Masked entries get zero gradient and never produce
    inf or NaN, not even in the backward pass.
    """
    has = jnp.any(mask, axis=-1)
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
    m = jnp.where(has, m, 0.0)
    shifted = jnp.where(mask, s - m[..., None], 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=-1)
    return jnp.where(has, m + jnp.log(jnp.where(has, total, 1.0)), 0.0), has


def _logaddexp_masked(a: jax.Array, b: jax.Array, b_mask: jax.Array) -> jax.Array:
    # log(exp(a) + exp(b)) where b is present, else a; no NaN gradient when b is absent.
    return jnp.where(b_mask, jnp.logaddexp(a, jnp.where(b_mask, b, a)), a)


def pgpc_loss(
    rng: jax.Array,
    emb: jax.Array,
    labels: jax.Array,
    confidence: jax.Array,
    is_target: jax.Array,
    valid: jax.Array,
    ruled_in: jax.Array,
    protos: dict[str, jax.Array],
    *,
    num_classes: int,
    temperature: float = 0.1,
    reliable_threshold: float = 0.968,
    prototype_momentum: float = 0.99,
    num_anchors: int = 1024,
    num_negatives: int = 2048,
    num_unreliable: int = 1024,
    source_anchors: bool = True,
    positives: str = "prototype",
    unreliable_negatives: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """Pseudo-label guided pixel contrast, this project's reconstruction [reconstructed].

    With z = L2-normalise(emb) and s = z . z' / temperature:
      1. reliable = valid & label != ignore & confidence >= reliable_threshold;
         unreliable = valid & is_target & confidence < reliable_threshold.
      2. The prototypes are first updated (`update_prototypes`, EMA `prototype_momentum`) from
         the stop-gradient z of the reliable pixels, then used normalised; a class never seen
         has no prototype and its anchors are invalid.
      3. Anchors: `num_anchors` reliable pixels (target ones, and source ones if
         `source_anchors`), class-balanced (`sample_class_balanced`).
      4. Negatives: `num_negatives` reliable pixels sampled uniformly, counted for anchor a iff
         their label differs from y_a; plus (if `unreliable_negatives`) `num_unreliable`
         unreliable pixels sampled uniformly, counted iff y_a is not in their teacher's top-K
         (`ruled_in`).
      5. positives='prototype': l_a = -log(exp(s_pos) / (exp(s_pos) + sum_neg exp(s_k))) with
         s_pos the similarity to the prototype of y_a. positives='pixel': the positives are the
         pixels of the negatives' pool with label y_a (other than a itself), the same InfoNCE
         per positive, averaged over them; an anchor without a positive is invalid.
      6. loss = mean of l_a over valid anchors, 0 (with a zero gradient) when there is none.
    The gradient flows into the anchors and the pixel negatives / positives, not the prototypes.

    Args:
      rng: PRNG key (all the sampling).
      emb: [N, D] raw (not normalised) embeddings of the grid pixels of the global batch.
      labels: int [N] (source ground truth, or mixed labels); `ignore_index` never reliable.
      confidence: float [N], 1 for source pixels, the teacher's max probability for target ones.
      is_target: bool [N], the pixel carries a pseudo-label.
      valid: bool [N], the pixel may be used at all (e.g. weight > 0).
      ruled_in: int [N, K], the teacher's top-K classes (read for unreliable target pixels).
      protos: {'mean': [C, D], 'seen': bool [C]} from the train state.
      num_classes: C.
      temperature: divides the similarities.
      reliable_threshold: confidence from which a pixel is reliable.
      prototype_momentum: EMA weight of the old prototype.
      num_anchors, num_negatives, num_unreliable: fixed sample sizes (clipped to N).
      source_anchors: whether source (non-target) pixels may be anchors.
      positives: 'prototype' or 'pixel'.
      unreliable_negatives: whether unreliable target pixels are negatives.
      ignore_index: the ignore label.

    Returns:
      (loss scalar, new prototypes, stats): stats 'contrast/anchors' (valid anchors),
      'contrast/negatives' and 'contrast/unreliable' (mean counted negatives per valid anchor),
      'contrast/positives' (mean positives per valid anchor), 'contrast/reliable_share'
      (reliable / valid pixels), 'contrast/prototypes' (classes with a prototype).
    """
    if positives not in ("prototype", "pixel"):
        raise ValueError(f"positives must be 'prototype' or 'pixel', got {positives!r}")
    if protos["mean"].shape[0] != num_classes:
        raise ValueError(f"prototypes have {protos['mean'].shape[0]} classes, not {num_classes}")
    z = l2_normalize(jnp.asarray(emb))  # [N, D]
    dtype = z.dtype
    labels = jnp.asarray(labels, jnp.int32)
    confidence, ruled_in = jnp.asarray(confidence), jnp.asarray(ruled_in)
    is_target, valid = jnp.asarray(is_target, bool), jnp.asarray(valid, bool)
    in_range = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    reliable = valid & in_range & (confidence >= reliable_threshold)
    unreliable = valid & is_target & (confidence < reliable_threshold)

    new_protos = update_prototypes(protos, z, labels, reliable, prototype_momentum)
    proto_hat = jax.lax.stop_gradient(l2_normalize(new_protos["mean"].astype(dtype)))  # [C, D]

    rng_anchor, rng_neg, rng_unrel = jax.random.split(rng, 3)
    eligible = reliable & (is_target | source_anchors)
    a_idx, a_ok = sample_class_balanced(rng_anchor, labels, eligible, num_anchors, num_classes)
    n_idx, n_ok = sample_uniform(rng_neg, reliable, num_negatives)
    za, ya = z[a_idx], labels[a_idx]  # [A, D], [A]
    zn, yn = z[n_idx], labels[n_idx]  # [M, D], [M]
    a_ok = a_ok & new_protos["seen"][jnp.clip(ya, 0, num_classes - 1)]

    # Negatives for each anchor: the pixel pool, then the unreliable pool.
    s_neg = jnp.matmul(za, zn.T) / temperature  # [A, M]
    neg_mask = n_ok[None, :] & (yn[None, :] != ya[:, None])
    neg_logits, neg_masks = [s_neg], [neg_mask]
    use_unreliable = unreliable_negatives and num_unreliable > 0
    if use_unreliable:
        u_idx, u_ok = sample_uniform(rng_unrel, unreliable, num_unreliable)
        zu, ru = z[u_idx], ruled_in[u_idx]  # [U, D], [U, K]
        unrel_mask = u_ok[None, :] & ~jnp.any(ru[None, :, :] == ya[:, None, None], axis=-1)
        neg_logits.append(jnp.matmul(za, zu.T) / temperature)
        neg_masks.append(unrel_mask)
    lse_neg, has_neg = _masked_logsumexp(
        jnp.concatenate(neg_logits, axis=1), jnp.concatenate(neg_masks, axis=1)
    )  # [A]

    if positives == "prototype":
        s_pos = jnp.sum(za * proto_hat[jnp.clip(ya, 0, num_classes - 1)], axis=-1) / temperature
        # -log(e^p / (e^p + N)) = log(e^p + N) - p; exactly 0 without negatives.
        per_anchor = _logaddexp_masked(s_pos, lse_neg, has_neg) - s_pos
        num_pos = jnp.ones_like(s_pos)
    else:
        pos_mask = n_ok[None, :] & (yn[None, :] == ya[:, None]) & (n_idx[None, :] != a_idx[:, None])
        per_pair = _logaddexp_masked(s_neg, lse_neg[:, None], has_neg[:, None]) - s_neg  # [A, M]
        num_pos = jnp.sum(pos_mask, axis=1).astype(dtype)
        per_anchor = jnp.sum(jnp.where(pos_mask, per_pair, 0.0), axis=1) / jnp.maximum(num_pos, 1)
        a_ok = a_ok & (num_pos > 0)

    a_w = a_ok.astype(dtype)
    count = jnp.sum(a_w)
    denom = jnp.maximum(count, 1.0)
    loss = jnp.sum(jnp.where(a_ok, per_anchor, 0.0)) / denom
    stats = {
        "contrast/anchors": count,
        "contrast/negatives": jnp.sum(a_w * jnp.sum(neg_mask, axis=1)) / denom,
        "contrast/unreliable": (
            jnp.sum(a_w * jnp.sum(neg_masks[1], axis=1)) / denom
            if use_unreliable
            else jnp.zeros((), dtype)
        ),
        "contrast/positives": jnp.sum(a_w * num_pos) / denom,
        "contrast/reliable_share": jnp.sum(reliable) / jnp.maximum(jnp.sum(valid), 1),
        "contrast/prototypes": jnp.sum(new_protos["seen"]).astype(dtype),
    }
    return loss, new_protos, stats
