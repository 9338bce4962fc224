"""Checkpoints on disk with orbax.

A *weights directory* holds one model's variables, usable without the config it was trained
with:

  DIR/model.json    {"model": <the config's model group>, "meta": {classes, source, ...}}
  DIR/variables/    orbax StandardCheckpointer tree {'params', 'batch_stats'}

`python -m pgpc_jax.convert to-flax` writes one; `predict`, `evaluate` and `init_from` read it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"


class CheckpointError(ValueError):
    """A weights directory is missing, incomplete or does not fit the model."""


def save_variables(path: str, variables: Mapping, model_cfg: Mapping, meta: Mapping) -> None:
    """Write a weights directory at `path` (created; an existing one is replaced)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, VARIABLES_DIR)
    tree = jax.tree.map(np.asarray, dict(variables))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, tree, force=True)
        ckptr.wait_until_finished()
    with open(os.path.join(path, MODEL_FILE), "w") as f:
        json.dump({"model": dict(model_cfg), "meta": dict(meta)}, f, indent=2, sort_keys=True)


def read_model_file(path: str) -> dict[str, Any]:
    """The `model.json` of a weights directory, with a clear error if it is not one."""
    file = os.path.join(path, MODEL_FILE)
    if not os.path.isdir(path) or not os.path.isfile(file):
        raise CheckpointError(
            f"{path} is not a pgpc_jax weights directory (expected {MODEL_FILE} and {VARIABLES_DIR}/ "
            "in it; make one with `python -m pgpc_jax.convert to-flax`)"
        )
    with open(file) as f:
        return json.load(f)


def load_variables(path: str, template: Mapping) -> dict:
    """Restore the variables of a weights directory into the structure of `template`
    (arrays or ShapeDtypeStructs, e.g. `segmentor.abstract_variables(model)`)."""
    read_model_file(path)
    target = os.path.join(os.path.abspath(path), VARIABLES_DIR)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dict(template))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            metadata = ckptr.metadata(target)
        except Exception as e:  # orbax raises several types for a damaged directory
            raise CheckpointError(f"{target}: cannot read the orbax checkpoint ({e})") from e
        stored = _shapes(metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata)
        wanted = _shapes(abstract)
        if stored != wanted:
            missing = sorted(set(wanted) - set(stored))
            unexpected = sorted(set(stored) - set(wanted))
            shapes = sorted(
                f"{k}: stored {stored[k]} vs model {wanted[k]}"
                for k in set(stored) & set(wanted)
                if stored[k] != wanted[k]
            )
            raise CheckpointError(
                f"{path} does not fit the model: missing {len(missing)} {missing[:5]}, "
                f"unexpected {len(unexpected)} {unexpected[:5]}, shape mismatches "
                f"{len(shapes)} {shapes[:5]}"
            )
        return ckptr.restore(target, abstract)


class RunCheckpoints:
    """Checkpoints of a training run, with automatic resume and keep-best.

      WORKDIR/checkpoints/<step>/   the last `keep` states (TrainState + data iterator states)
      WORKDIR/best/<step>/          the state with the best `best_metric` so far

    Saving is asynchronous (orbax); `close()` waits for it.
    """

    def __init__(self, workdir: str, keep: int = 2, best_metric: str = "eval/miou"):
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                best_fn=lambda m: m[best_metric],
                best_mode="max",
                keep_checkpoints_without_metrics=False,
            ),
        )

    @staticmethod
    def _args(state, data_state: Mapping[str, Any]) -> ocp.args.Composite:
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))
        )

    def save(self, step: int, state, data_state: Mapping[str, Any]) -> None:
        self.latest.save(step, args=self._args(state, data_state))

    def save_if_best(self, step: int, state, data_state, metrics: Mapping[str, float]) -> bool:
        """Keep `state` as the best if its `best_metric` beats the best so far."""
        best = self.best.best_step()
        if best is not None:
            previous = self.best.metrics(best) or {}
            if previous.get(self.best_metric, -np.inf) >= metrics[self.best_metric]:
                return False
        self.best.save(step, args=self._args(state, data_state), metrics=dict(metrics))
        return True

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(self, abstract_state) -> tuple[Any, dict]:
        """Restore the latest checkpoint into the structure of `abstract_state`."""
        step = self.latest.latest_step()
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["data"] or {})

    def close(self) -> None:
        for manager in (self.latest, self.best):
            manager.wait_until_finished()
            manager.close()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(getattr(v, "shape", ())) for p, v in flat}
