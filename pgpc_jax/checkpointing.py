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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(getattr(v, "shape", ())) for p, v in flat}
