"""A fixed-size ring buffer of rows (features, optional labels) for memory banks such as CPSL's
feature and logit queues.

CPSL's released queues (`train.py`, `CustomModel.step` of lslrh/CPSL) are zero tensors of
[65536, D] shifted by 256 rows per image, the newest rows written at the top:
`queue[fbs:] = queue[:-fbs]; queue[:fbs] = rows`. Here the same content is kept without moving
memory: rows are written at a write pointer that wraps around, and a filled count says how many
slots hold data. The slot order differs from the released queue's [fixed shape]; the consumers
(the Sinkhorn over [bank; current], the contrastive mean over the bank) do not depend on it.
The released "the queue is in use" test, `not torch.all(queue[-1] == 0)`, is true exactly once
L rows were pushed: `is_full` here.

`push` takes a fixed number of rows and a validity mask: the valid rows are compacted to the
front in their order (a stable sort on the mask, fixed shape) and written at the pointer; the
invalid ones are skipped. Pushing more than L valid rows keeps the last L, as pushing them one
by one would.

The buffer is a plain dict of arrays (pure functions; it can live in a train state, be
replicated and checkpointed): `feats` [L, D], `labels` int32 [L] (only when created with
labels), `next` int32 scalar (the slot the next row goes to), `filled` int32 scalar (<= L).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_buffer(
    length: int, dim: int, dtype: jnp.dtype = jnp.float32, with_labels: bool = True
) -> dict[str, jax.Array]:
    """An empty buffer of `length` rows of width `dim`, all zeros (as the released queues).

    Args:
      length: L, the number of slots.
      dim: D, the row width.
      dtype: the rows' dtype.
      with_labels: whether to keep an int32 label per row.

    Returns:
      {'feats': [L, D] zeros, 'labels': int32 [L] zeros (if with_labels), 'next': int32 0,
      'filled': int32 0}.
    """
    if length < 1 or dim < 1:
        raise ValueError(f"init_buffer: length={length} and dim={dim} must be >= 1")
    buffer = {
        "feats": jnp.zeros((length, dim), dtype),
        "next": jnp.zeros((), jnp.int32),
        "filled": jnp.zeros((), jnp.int32),
    }
    if with_labels:
        buffer["labels"] = jnp.zeros((length,), jnp.int32)
    return buffer


def push(
    buffer: dict[str, jax.Array],
    rows: jax.Array,
    valid: jax.Array,
    labels: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Write the valid rows, in their order, at the write pointer, wrapping around.

    Args:
      buffer: a buffer from `init_buffer` (or an earlier `push`).
      rows: [N, D] candidate rows (cast to the buffer's dtype).
      valid: bool [N]; only these rows are written.
      labels: int [N], required exactly when the buffer keeps labels.

    Returns:
      A new buffer: with k valid rows, slots next, next + 1, ... (mod L) hold them (the last L
      of them when k > L), `next` advances by k (mod L), `filled` = min(filled + k, L).
    """
    length, dim = buffer["feats"].shape
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(f"push: rows must be [N, {dim}], got {tuple(rows.shape)}")
    num = rows.shape[0]
    valid = jnp.broadcast_to(jnp.asarray(valid, bool), (num,))
    if ("labels" in buffer) != (labels is not None):
        raise ValueError("push: give labels exactly when the buffer keeps labels")

    # Valid rows first, each group in its original order (a stable sort on the mask).
    order = jnp.argsort(~valid, stable=True)
    count = jnp.sum(valid.astype(jnp.int32))
    rank = jnp.arange(num, dtype=jnp.int32)
    # Only the last L valid rows survive; every other position writes nowhere (slot L, dropped).
    written = (rank < count) & (rank >= count - length)
    slots = jnp.where(written, (buffer["next"] + rank) % length, length)

    out = dict(buffer)
    out["feats"] = (
        buffer["feats"]
        .at[slots]
        .set(jnp.asarray(rows)[order].astype(buffer["feats"].dtype), mode="drop")
    )
    if labels is not None:
        out["labels"] = (
            buffer["labels"].at[slots].set(jnp.asarray(labels, jnp.int32)[order], mode="drop")
        )
    out["next"] = ((buffer["next"] + count) % length).astype(jnp.int32)
    out["filled"] = jnp.minimum(buffer["filled"] + count, length).astype(jnp.int32)
    return out


def valid_slots(buffer: dict[str, jax.Array]) -> jax.Array:
    """bool [L]: the slots that hold a pushed row (the first `filled` ones: rows are written
    from slot 0 on and only overwrite once all L are filled)."""
    length = buffer["feats"].shape[0]
    return jnp.arange(length) < buffer["filled"]


def is_full(buffer: dict[str, jax.Array]) -> jax.Array:
    """bool scalar: every slot holds a row (the released `not torch.all(queue[-1] == 0)`)."""
    return buffer["filled"] >= buffer["feats"].shape[0]
