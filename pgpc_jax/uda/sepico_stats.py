"""SePiCo's running source statistics: per-class mean, diagonal variance, pixel count and the
memory bank of batch centroids, as the released `ProtoEstimator.update_proto`
(`mmseg/models/utils/proto_estimator.py`, BIT-DA/SePiCo).

Every step, the EMA teacher's projected source embeddings and their (downscaled) ground truth
update the statistics before the contrastive losses read them. For each class c with n_c valid
pixels in the batch (all images of the batch together), batch mean m_c and biased per-dimension
variance v_c:

    w_c      = n_c / (n_c + count_c)                  (0 when both are 0)
    var_c   <- (1 - w_c) var_c + w_c v_c + w_c (1 - w_c) (mean_c - m_c)^2
    mean_c  <- (1 - w_c) mean_c + w_c m_c
    count_c <- count_c + n_c

which is the exact mean and biased variance of every pixel of class c seen so far (no decay).
Classes absent from the batch keep their statistics.

The memory bank (BankCL) is the reference's `deque([zeros(A)], maxlen=L)` per class: it starts
with ONE zero vector, every update appends m_c of each class present in the batch, and the
oldest entry drops out once L entries are held. Here it is a ring buffer of fixed shape:
`bank [C, L, A]`, `bank_valid [C, L]` and the next slot to write `bank_next [C]`. The slot order
differs from the deque's (the losses only average over entries, so order does not matter);
`ordered_bank` gives the deque's order when needed.

The statistics are a plain dict of arrays, so they sit in `TrainState.method_state`, are
replicated like the parameters and are checkpointed by orbax with them.

Choice of the count's dtype: float32, as the reference (`torch.zeros` is float32). One class can
collect 60k steps x 2 images x 160 x 160 cells = 3.1e9 pixels, past int32's 2.1e9, so int32
could overflow; float32 cannot. Past 2^24 pixels float32 rounds each sum `count + n` by at most
2^-24 of its value (a spacing of 256 near 3e9), so w carries at most that relative error and the
count drifts by under 0.3 % over 60k worst-case steps (far less in practice, the roundings being
unbiased). The reference has the same float32 behaviour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def init_stats(num_classes: int, dim: int, bank_length: int = 0) -> dict[str, jax.Array]:
    """Empty statistics, as `ProtoEstimator.__init__` without `resume`.

    Args:
      num_classes: C.
      dim: A, the embedding width.
      bank_length: L, the memory bank's `memory_length`; 0 (the reference's default) keeps no
        bank.

    Returns:
      {'mean': float32 [C, A] zeros, 'variance': float32 [C, A] zeros, 'count': float32 [C]
      zeros} and, when L > 0, {'bank': float32 [C, L, A] zeros, 'bank_valid': bool [C, L] with
      only slot 0 set (the deque's initial zero vector), 'bank_next': int32 [C] = 1 % L}.
    """
    if num_classes < 1 or dim < 1 or bank_length < 0:
        raise ValueError(
            f"init_stats: num_classes={num_classes}, dim={dim} must be >= 1 and "
            f"bank_length={bank_length} >= 0"
        )
    stats = {
        "mean": jnp.zeros((num_classes, dim), jnp.float32),
        "variance": jnp.zeros((num_classes, dim), jnp.float32),
        "count": jnp.zeros((num_classes,), jnp.float32),
    }
    if bank_length > 0:
        stats["bank"] = jnp.zeros((num_classes, bank_length, dim), jnp.float32)
        stats["bank_valid"] = jnp.zeros((num_classes, bank_length), jnp.bool_).at[:, 0].set(True)
        stats["bank_next"] = jnp.full((num_classes,), 1 % bank_length, jnp.int32)
    return stats


def batch_class_moments(
    feats: jax.Array, labels: jax.Array, valid: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-class pixel count, mean and biased variance of one batch (two passes, as the reference).

    Args:
      feats: [N, A] embeddings.
      labels: int [N]; values outside [0, C) never count.
      valid: bool [N], the pixels that count.
      num_classes: C.

    Returns:
      (n float32 [C], m float32 [C, A], v float32 [C, A]); m = v = 0 for absent classes.
    """
    feats = feats.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * valid[:, None]  # [N, C]
    n = jnp.sum(onehot, axis=0)  # [C]
    denom = jnp.maximum(n, 1.0)[:, None]
    m = jnp.einsum("nc,na->ca", onehot, feats, precision=_HIGHEST) / denom
    centred = feats - jnp.take(m, labels, axis=0, mode="clip")  # [N, A]; other pixels weigh 0
    v = jnp.einsum("nc,na->ca", onehot, centred * centred, precision=_HIGHEST) / denom
    return n, m, v


def update_stats(
    stats: dict[str, jax.Array], feats: jax.Array, labels: jax.Array, valid: jax.Array
) -> dict[str, jax.Array]:
    """One `update_proto` step: fold a batch of embeddings into the running statistics.

    The gradient stops here (the reference passes `feat.detach()`).

    Args:
      stats: from `init_stats` or a previous `update_stats`.
      feats: [N, A] embeddings of all pixels of the batch (any float dtype; float32 inside).
      labels: int [N]; values outside [0, C) (e.g. the ignore index) never count.
      valid: bool [N], the pixels that count (the reference removes ignored pixels first).

    Returns:
      the new statistics, same structure, shapes and dtypes.
    """
    mean, variance, count = stats["mean"], stats["variance"], stats["count"]
    num_classes = mean.shape[0]
    feats = jax.lax.stop_gradient(feats)
    n, m, v = batch_class_moments(feats, labels, valid, num_classes)
    present = n > 0
    total = n + count
    # The reference sets the 0/0 weight (class never seen) to 0; absent classes get w = 0.
    w = jnp.where(total > 0, n / jnp.where(total > 0, total, 1.0), 0.0)[:, None]  # [C, 1]
    new_variance = (1.0 - w) * variance + w * v + w * (1.0 - w) * jnp.square(mean - m)
    new_mean = (1.0 - w) * mean + w * m
    out = dict(stats)
    out["variance"] = jnp.where(present[:, None], new_variance, variance)
    out["mean"] = jnp.where(present[:, None], new_mean, mean)
    out["count"] = count + n
    if "bank" in stats:
        bank, bank_valid, bank_next = stats["bank"], stats["bank_valid"], stats["bank_next"]
        length = bank.shape[1]
        write = jax.nn.one_hot(bank_next, length, dtype=jnp.bool_) & present[:, None]  # [C, L]
        out["bank"] = jnp.where(write[:, :, None], m[:, None, :], bank)
        out["bank_valid"] = bank_valid | write
        out["bank_next"] = jnp.where(present, (bank_next + 1) % length, bank_next)
    return out


def ordered_bank(stats: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The memory bank in the reference deque's order (oldest first, valid entries first).

    Args:
      stats: statistics holding a bank.

    Returns:
      (bank float32 [C, L, A], valid bool [C, L]); the first `valid[c].sum()` rows of class c
      are `list(MemoryBank[c])` of the reference.
    """
    bank, bank_valid, bank_next = stats["bank"], stats["bank_valid"], stats["bank_next"]
    length = bank.shape[1]
    # Until the ring wraps, slots [0, next) are filled in order; once full, `next` is the oldest.
    start = jnp.where(jnp.all(bank_valid, axis=1), bank_next, 0)
    order = (jnp.arange(length)[None, :] + start[:, None]) % length  # [C, L]
    return (
        jnp.take_along_axis(bank, order[:, :, None], axis=1),
        jnp.take_along_axis(bank_valid, order, axis=1),
    )
