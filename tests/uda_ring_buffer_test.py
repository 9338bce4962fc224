"""The memory-bank ring buffer: slot order and wrap-around on hand-made pushes, invalid rows
skipped, more rows than slots, jit, and random pushes against a row-by-row Python model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax.uda import ring_buffer

_push = jax.jit(ring_buffer.push)


def _rows(values):
    # Row r of width 2 is (v, -v), so the slot a row landed in is readable from its value.
    v = np.asarray(values, np.float32)
    return np.stack([v, -v], axis=1)


def _check(buffer, feats, labels, next_slot, filled):
    np.testing.assert_array_equal(np.asarray(buffer["feats"])[:, 0], feats)
    np.testing.assert_array_equal(np.asarray(buffer["feats"])[:, 1], -np.asarray(feats))
    np.testing.assert_array_equal(np.asarray(buffer["labels"]), labels)
    assert int(buffer["next"]) == next_slot and int(buffer["filled"]) == filled


def test_hand_made_pushes_order_wrap_and_invalid_rows():
    buf = ring_buffer.init_buffer(5, 2)
    _check(buf, [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], 0, 0)
    assert not bool(ring_buffer.is_full(buf)) and not np.asarray(ring_buffer.valid_slots(buf)).any()

    # Rows 1..4, row 2 invalid: 1, 3, 4 go to slots 0, 1, 2 in that order.
    buf = _push(
        buf, _rows([1, 2, 3, 4]), np.array([True, False, True, True]), np.array([7, 8, 9, 6])
    )
    _check(buf, [1, 3, 4, 0, 0], [7, 9, 6, 0, 0], 3, 3)
    np.testing.assert_array_equal(ring_buffer.valid_slots(buf), [1, 1, 1, 0, 0])

    # Four valid rows wrap around: slots 3, 4, 0, 1; slot 2 keeps row 4.
    buf = _push(buf, _rows([5, 6, 7, 8]), np.ones(4, bool), np.array([1, 2, 3, 4]))
    _check(buf, [7, 8, 4, 5, 6], [3, 4, 6, 1, 2], 2, 5)
    assert bool(ring_buffer.is_full(buf)) and np.asarray(ring_buffer.valid_slots(buf)).all()

    # Nothing valid: nothing changes.
    unchanged = _push(buf, _rows([9, 10, 11, 12]), np.zeros(4, bool), np.array([5, 5, 5, 5]))
    _check(unchanged, [7, 8, 4, 5, 6], [3, 4, 6, 1, 2], 2, 5)

    # Invalid rows first and last, valid ones in between: compaction keeps their order.
    buf = _push(buf, _rows([20, 21, 22, 23]), np.array([False, True, True, False]), np.arange(4))
    _check(buf, [7, 8, 21, 22, 6], [3, 4, 1, 2, 2], 4, 5)


def test_more_valid_rows_than_slots_keeps_the_last_ones():
    buf = ring_buffer.init_buffer(3, 2)
    buf = _push(
        buf, _rows([1, 2, 3, 4, 5, 6, 7]), np.array([1, 1, 0, 1, 1, 1, 1], bool), np.arange(7)
    )
    # Valid rows 1, 2, 4, 5, 6, 7 one by one into 3 slots from slot 0: 7 at slot 2, 6 at 1, 5 at 0.
    _check(buf, [5, 6, 7], [4, 5, 6], 0, 3)


def _model_push(state, rows, valid, labels):
    # Row-by-row reference: write at the pointer, advance, wrap.
    feats, labs, nxt, filled = state
    for r, v, y in zip(rows, valid, labels):
        if v:
            feats[nxt], labs[nxt] = r, y
            nxt = (nxt + 1) % len(feats)
            filled = min(filled + 1, len(feats))
    return feats, labs, nxt, filled


def test_random_pushes_match_a_row_by_row_model():
    rng = np.random.default_rng(0)
    length, width = 7, 3
    buf = ring_buffer.init_buffer(length, width)
    state = (np.zeros((length, width), np.float32), np.zeros(length, np.int32), 0, 0)
    for _ in range(12):
        rows = rng.normal(size=(5, width)).astype(np.float32)
        valid = rng.random(5) < 0.6
        labels = rng.integers(0, 19, 5)
        buf = _push(buf, rows, valid, labels)
        state = _model_push(state, rows, valid, labels)
        np.testing.assert_array_equal(np.asarray(buf["feats"]), state[0])
        np.testing.assert_array_equal(np.asarray(buf["labels"]), state[1])
        assert int(buf["next"]) == state[2] and int(buf["filled"]) == state[3]
    assert state[3] == length  # the sequence wrapped


def test_buffer_without_labels_dtypes_and_errors():
    buf = ring_buffer.init_buffer(4, 3, jnp.float32, with_labels=False)
    assert set(buf) == {"feats", "next", "filled"}
    new = jax.jit(ring_buffer.push)(buf, jnp.ones((2, 3), jnp.bfloat16), jnp.array([True, True]))
    assert new["feats"].dtype == jnp.float32 and new["next"].dtype == jnp.int32
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, buf)
    np.testing.assert_array_equal(np.asarray(new["feats"])[:, 0], [1, 1, 0, 0])
    with pytest.raises(ValueError, match="labels"):
        ring_buffer.push(buf, jnp.ones((2, 3)), jnp.ones(2, bool), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="labels"):
        ring_buffer.push(ring_buffer.init_buffer(4, 3), jnp.ones((2, 3)), jnp.ones(2, bool))
    with pytest.raises(ValueError, match="rows must be"):
        ring_buffer.push(buf, jnp.ones((2, 4)), jnp.ones(2, bool))
    with pytest.raises(ValueError, match="length"):
        ring_buffer.init_buffer(0, 3)
