"""Batches put on the devices ahead of the step, with the input wait measured.

`DevicePrefetcher(iterator, put, depth)` wraps a host iterator (a grain `DatasetIterator`):
`next()` returns a batch already on the devices, and `fill()`, called by the training loop just
after it has dispatched a step, reads and transfers the next batches while that step computes.
So the host's input work (decoding, augmentation, the copy to the device) overlaps the step
instead of preceding it.

Checkpoints record the iterator's position after the last batch the *step* consumed, not after
the batches read ahead: `get_state()` / `set_state()` are those of the consumed position, so a
resumed run reads exactly the batches an uninterrupted one would (prefetching never changes a
run's numbers).

`pop_wait_s()` gives the time spent reading host batches since the last call: the training loop
logs it per step as `perf/data_wait_ms`. The device waits for data only when that time exceeds
the step's own (`docs/results.md`, "CPU step time against PyTorch").
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any, Callable, Iterator


class DevicePrefetcher:
    """A host iterator read `depth` batches ahead onto the devices.

    Args:
      iterator: host batches, with `get_state()` / `set_state(state)` (a grain iterator).
      put: host batch -> device batch (e.g. `sharding.global_batch(batch, mesh)`).
      depth: batches kept on the devices ahead of the step; 0 reads each batch when asked.
    """

    def __init__(self, iterator: Iterator, put: Callable[[Any], Any], depth: int = 2):
        if depth < 0:
            raise ValueError(f"data.prefetch={depth}: expected 0 (off) or more batches")
        self.iterator, self.put, self.depth = iterator, put, depth
        self._buffer: collections.deque = collections.deque()
        self._consumed = self._state()
        self._wait_s = 0.0

    def _state(self) -> bytes:
        # A serialised copy: the position must not change when the iterator reads on. Bytes, as
        # grain's checkpoint handler stores a non-`DatasetIterator` item's state.
        return json.dumps(self.iterator.get_state()).encode()

    def _read(self) -> tuple[Any, Any]:
        start = time.perf_counter()
        host = next(self.iterator)
        state = self._state()
        batch = self.put(host)
        self._wait_s += time.perf_counter() - start
        return batch, state

    def fill(self) -> None:
        """Read and transfer batches until `depth` are waiting."""
        while len(self._buffer) < self.depth:
            self._buffer.append(self._read())

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        batch, state = self._buffer.popleft() if self._buffer else self._read()
        self._consumed = state
        return batch

    def get_state(self) -> bytes:
        """The wrapped iterator's state (JSON bytes) after the last batch `next()` returned."""
        return self._consumed

    def set_state(self, state: bytes) -> None:
        """Position the wrapped iterator at `state` (as `get_state` gives it), dropping the
        batches read ahead."""
        self.iterator.set_state(json.loads(state))
        self._buffer.clear()
        self._consumed = bytes(state)

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; reading ahead starts at `fill`."""

    def pop_wait_s(self) -> float:
        """Seconds spent reading and transferring batches since the last call."""
        wait, self._wait_s = self._wait_s, 0.0
        return wait
