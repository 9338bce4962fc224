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

import grain
import grain.checkpoint  # noqa: F401  (registers grain's iterator handler with orbax)
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"


class CheckpointError(ValueError):
    """A weights directory is missing, incomplete or does not fit the model."""


def save_variables(path: str, variables: Mapping, model_cfg: Mapping, meta: Mapping) -> None:
    """Write a weights directory at `path` (created; an existing one is replaced)."""
    path = run_path(path)
    path.mkdir(parents=True, exist_ok=True)
    tree = jax.tree.map(np.asarray, dict(variables))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / VARIABLES_DIR, tree, force=True)
        ckptr.wait_until_finished()
    text = json.dumps({"model": dict(model_cfg), "meta": dict(meta)}, indent=2, sort_keys=True)
    (path / MODEL_FILE).write_text(text)


def is_weights_dir(path: str) -> bool:
    return (run_path(path) / MODEL_FILE).is_file()


def read_model_file(path: str) -> dict[str, Any]:
    """The `model.json` of a weights directory, with a clear error if it is not one."""
    file = run_path(path) / MODEL_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{path} is not a pgpc_jax weights directory (expected {MODEL_FILE} and {VARIABLES_DIR}/ "
            "in it; make one with `python -m pgpc_jax.convert to-flax` or `python -m "
            "pgpc_jax.export`)"
        )
    return json.loads(file.read_text())


def load_variables(path: str, template: Mapping) -> dict:
    """Restore the variables of a weights directory into the structure of `template`
    (arrays or ShapeDtypeStructs, e.g. `segmentor.abstract_variables(model)`)."""
    read_model_file(path)
    target = run_path(path) / VARIABLES_DIR
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dict(template))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = _stored_shapes(target)
        except Exception as e:  # orbax raises several types for a damaged directory
            raise CheckpointError(f"{target}: cannot read the orbax checkpoint ({e})") from e
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


def run_path(path: str | os.PathLike) -> epath.Path:
    """A run or weights directory as an `epath.Path`: local paths made absolute (orbax needs
    that), `gs://...` kept as it is."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else path.expanduser().resolve()


class RunCheckpoints:
    """Checkpoints of a training run, with automatic resume and keep-best.

      WORKDIR/checkpoints/<step>/   the last `keep` states
      WORKDIR/best/<step>/          the state with the best `best_metric` so far

    Each checkpoint holds the TrainState (`state/`, written by all processes together) and each
    data iterator's position (`data_<name>/process_<p>-of-<P>.json`, grain's handler: every
    process saves and restores its own). Saving is asynchronous (orbax); `close()` waits for it.
    A checkpoint that cannot be read is reported, moved aside to `WORKDIR/checkpoints/damaged-<step>`
    (nothing is deleted) and the previous one is used.
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, best_metric: str = "eval/miou"):
        self.root = run_path(workdir)
        self.best_metric = best_metric
        self._keep = keep
        self.latest = self._latest_manager()
        self.best = ocp.CheckpointManager(
            self.root / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                best_fn=lambda m: m[best_metric],
                best_mode="max",
                keep_checkpoints_without_metrics=False,
            ),
        )

    def _latest_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.root / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True),
        )

    @staticmethod
    def _args(state, iterators: Mapping[str, Any]) -> ocp.args.Composite:
        data = {f"data_{k}": grain.checkpoint.CheckpointSave(v) for k, v in iterators.items()}
        return ocp.args.Composite(state=ocp.args.StandardSave(state), **data)

    def save(self, step: int, state, iterators: Mapping[str, Any]) -> None:
        """Save `state` and the iterators' positions (all processes call this)."""
        # One manager writes at a time: two asynchronous saves of different managers in flight
        # together deadlocked orbax's cross-process barriers (measured with 2 CPU processes).
        self.best.wait_until_finished()
        self.latest.save(step, args=self._args(state, iterators))

    def save_if_best(self, step: int, state, iterators, metrics: Mapping[str, float]) -> bool:
        """Keep `state` as the best if its `best_metric` beats the best so far."""
        if step in self.best.all_steps():  # a resumed run redoing a step saved before a kill
            return False
        best = self.best.best_step()
        if best is not None:
            previous = self.best.metrics(best) or {}
            if previous.get(self.best_metric, -np.inf) >= metrics[self.best_metric]:
                return False
        self.latest.wait_until_finished()  # see `save`
        self.best.save(step, args=self._args(state, iterators), metrics=dict(metrics))
        return True

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def mismatch(self, abstract_state, step: int | None = None) -> list[str]:
        """How the stored state of `step` (default: the latest) differs in structure from
        `abstract_state`: ['missing ...', 'unexpected ...', '<leaf>: stored (..) vs (..)'], empty
        when it fits (or when the metadata cannot be read: `restore` reports that)."""
        step = self.latest_step() if step is None else step
        try:
            stored = _stored_shapes(self.root / "checkpoints" / str(step) / "state")
        except Exception:  # a damaged checkpoint: restore() reports it and falls back
            return []
        # orbax answers an unreadable tree with empty metadata: damaged, not another model.
        return _differences(stored, _shapes(abstract_state)) if stored else []

    def restore(self, abstract_state, iterators: Mapping[str, Any], log=print) -> tuple[Any, int]:
        """Restore the latest readable checkpoint into `abstract_state` (ShapeDtypeStructs,
        with shardings) and set the iterators to their saved positions.

        Returns:
          (state, step). Raises CheckpointError if no checkpoint can be read.
        """
        for step in sorted(self.latest.all_steps(), reverse=True):
            _check_process_count(self.root / "checkpoints" / str(step), iterators)
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                **{
                    f"data_{k}": grain.checkpoint.CheckpointRestore(v) for k, v in iterators.items()
                },
            )
            try:
                restored, error = self.latest.restore(step, args=args), None
            except Exception as e:  # orbax / tensorstore raise many types for damaged files
                restored, error = None, e
            if _all_processes_ok(error is None):
                return restored["state"], step
            reason = (
                f"{type(error).__name__}: {error}" if error else "unreadable on another process"
            )
            aside = self.root / "checkpoints" / f"damaged-{step}"
            log(
                f"checkpoint {self.root / 'checkpoints' / str(step)} cannot be read "
                f"({_first_line(reason)}); moved to {aside}, trying the previous one"
            )
            if jax.process_index() == 0:
                (self.root / "checkpoints" / str(step)).rename(aside)
            _sync("pgpc_jax_damaged_checkpoint")
            self.latest.close()
            self.latest = self._latest_manager()
        raise CheckpointError(f"no readable checkpoint in {self.root / 'checkpoints'}")

    def read(self, abstract_state, step: int | None = None, best: bool = False) -> tuple[Any, int]:
        """One checkpoint's state without the data positions and without falling back (what
        exporting a run needs): the latest, the given `step`, or with `best` the best one.

        Args:
          abstract_state: ShapeDtypeStructs of the TrainState, with the shardings to restore to.
          step: a step of `checkpoints/` (or of `best/` with `best`); None for the latest / best.
          best: read `best/` instead of `checkpoints/`.

        Returns:
          (state, step). Raises CheckpointError naming the steps there are.
        """
        manager, folder = (self.best, "best") if best else (self.latest, "checkpoints")
        steps = sorted(manager.all_steps())
        if step is None:
            step = manager.best_step() if best else manager.latest_step()
        if step is None or step not in steps:
            have = f"it has steps {steps}" if steps else "it has none"
            want = "checkpoint" if step is None else f"checkpoint of step {step}"
            raise CheckpointError(f"{self.root / folder} has no {want}; {have}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        try:
            restored = manager.restore(step, args=args)
        except Exception as e:  # orbax / tensorstore raise many types for damaged files
            raise CheckpointError(
                f"checkpoint {self.root / folder / str(step)} cannot be read "
                f"({_first_line(f'{type(e).__name__}: {e}')})"
            ) from e
        return restored["state"], step

    def close(self) -> None:
        for manager in (self.latest, self.best):
            manager.wait_until_finished()
            manager.close()


def _check_process_count(directory: epath.Path, iterators: Mapping[str, Any]) -> None:
    """Data positions are per process: a checkpoint resumes only with the process count that
    wrote it (the state alone, e.g. for export, reads anywhere)."""
    for name in iterators:
        folder = directory / f"data_{name}"
        files = [p.name for p in folder.glob("process_*-of-*.json")] if folder.exists() else []
        counts = {int(n.rsplit("-of-", 1)[1][: -len(".json")]) for n in files}
        if counts and jax.process_count() not in counts:
            raise CheckpointError(
                f"{directory} was written by {max(counts)} process(es) and this run has "
                f"{jax.process_count()}: each process resumes its own data position, so resume "
                f"with {max(counts)} processes (or export the state: python -m pgpc_jax.export)"
            )


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit] + ("..." if len(line) > limit else "")


def _all_processes_ok(ok: bool) -> bool:
    """True when `ok` holds on every process (the same answer everywhere)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _differences(stored: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> list[str]:
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    out = []
    if missing:
        out.append(f"{len(missing)} missing in the checkpoint, e.g. {missing[:3]}")
    if unexpected:
        out.append(f"{len(unexpected)} not in the model, e.g. {unexpected[:3]}")
    out += [
        f"{k}: stored {stored[k]} vs now {wanted[k]}"
        for k in sorted(set(stored) & set(wanted))
        if stored[k] != wanted[k]
    ][:5]
    return out


def _stored_shapes(directory: epath.Path) -> dict[str, tuple[int, ...]]:
    """{leaf path: shape} of an orbax StandardCheckpointer tree, from its metadata only."""
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(directory)
    return _shapes(getattr(metadata, "item_metadata", metadata))


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{leaf path: shape}; a typed PRNG key counts as its key data (as orbax stores it)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        out[_path_name(path)] = tuple(getattr(leaf, "shape", ()))
    return out


def _path_name(path) -> str:
    """'params/backbone/block1_0/attn/q/kernel': the same for a dataclass field (the abstract
    state) and a dict key (the stored tree's metadata)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)
