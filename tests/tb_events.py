"""Reading a run's TensorBoard event files back the way TensorBoard does (its EventAccumulator,
with orphaned data purged: a resumed run's restart drops the interrupted run's later steps)."""

from __future__ import annotations

import os

from tensorboard.backend.event_processing import event_accumulator


def load(logdir: str | os.PathLike) -> event_accumulator.EventAccumulator:
    """Every event file of `logdir`, every event kept (no sampling)."""
    keep_all = {kind: 0 for kind in ("scalars", "images", "tensors", "histograms")}
    accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance=keep_all)
    accumulator.Reload()
    return accumulator


def scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} in step order, as TensorBoard plots them."""
    accumulator = load(logdir)
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
