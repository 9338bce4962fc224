"""train_and_evaluate: the whole run, top to bottom.

checks -> mesh -> data -> model and abstract state -> workdir (resume checks, config.json) ->
train state (restored, or initial) -> the jitted step -> the loop (log, finite check,
checkpoint, evaluate) -> final evaluation.

The step itself (`train_step.py`) is a pure function of (state, source batch, target batch);
everything with side effects lives here. Bad input (a config value, a dataset that is not
built, weights that do not fit, a workdir holding another model's run) raises before anything
is written; `main.py` turns those errors into one line. Under several processes every process
runs this same function; orbax writes the checkpoints collectively and process 0 alone writes
every other file.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from data_pipelines import dark_zurich, pipeline, sources, transforms
from data_pipelines.rcs import RcsConfig
from pgpc_jax import (
    checkpointing,
    class_set,
    evaluation,
    methods,
    metrics_logging,
    predict,
    prefetch,
    scores,
    sharding,
)
from pgpc_jax.config_checks import ConfigError, check_config
from pgpc_jax.models import segmentor
from pgpc_jax.train_state import TrainState, create_train_state
from pgpc_jax.train_step import make_train_step


def _say(message: str) -> None:
    """Print on process 0 only (every process runs the same loop)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _open_split(data_dir: str, name: str, group, with_label: bool = True):
    """One configured split, with errors that name the config key."""
    try:
        return sources.open_split(data_dir, group.dataset, group.split, with_label)
    except sources.UnknownSplitError as e:
        raise ConfigError(f"data.{name}.split={group.split!r}: {e}") from e
    except sources.DatasetNotBuiltError as e:
        raise ConfigError(f"data.{name}.dataset={group.dataset!r}: {e}") from e


def _open_day_night(data_dir: str, group):
    """Dark Zurich's night training images with their paired day images (`data.target.paired_day`),
    with errors that name the config key."""
    try:
        return dark_zurich.open_day_night_pairs(data_dir, group.dataset)
    except sources.UnknownSplitError as e:
        raise ConfigError(f"data.target.paired_day=True: {e}") from e
    except sources.DatasetNotBuiltError as e:
        raise ConfigError(f"data.target.dataset={group.dataset!r}: {e}") from e
    except dark_zurich.MissingCorrespondenceError as e:
        raise ConfigError(f"data.target.paired_day=True: {e}") from e


def _check_target_labels(source, config) -> None:
    """A method that reads the target's labels (pseudo-labels) must not get an unlabelled split:
    its examples' labels would be all ignore (255) and the loss silently 0."""
    group = config.data.target
    if all(np.all(source[i]["label"] == 255) for i in range(min(len(source), 8))):
        raise ConfigError(
            f"data.target.dataset={group.dataset!r} split={group.split!r}: method "
            f"{config.method!r} trains on the target's labels (pseudo-labels) but the first "
            "images of this split have none; make them with `python -m pgpc_jax.pseudo_label` "
            "and build its output with `python -m data_pipelines.build --dataset folder` "
            "(docs/data.md, 'Pseudo-labels as a training split')"
        )


def _check_crop(source, name: str, group) -> None:
    """A training crop must fit the images at the configured scale (read from the first one)."""
    height, width = source[0]["image"].shape[:2]
    if group.scale:
        width, height = transforms.rescale_size(width, height, tuple(group.scale))
    crop_h, crop_w = group.crop_size
    if crop_h > height or crop_w > width:
        raise ConfigError(
            f"data.{name}.crop_size={tuple(group.crop_size)} (height, width) is larger than the "
            f"{name} images at data.{name}.scale={tuple(group.scale) or 'native'}: "
            f"{height}x{width}; use a crop of at most ({height}, {width})"
        )


def _datasets(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
    """The source / target training pipelines and the validation pipeline of this process."""
    data, p, n = config.data, jax.process_index(), jax.process_count()
    src_cfg, tgt_cfg, val_cfg = data.source, data.target, data.val
    try:
        src_bs = sharding.check_batch_size(src_cfg.batch_size, mesh, "data.source.batch_size")
        tgt_bs = sharding.check_batch_size(tgt_cfg.batch_size, mesh, "data.target.batch_size")
        val_bs = sharding.check_batch_size(val_cfg.batch_size, mesh, "data.val.batch_size")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    src = _open_split(data.data_dir, "source", src_cfg)
    paired_day = bool(tgt_cfg.get("paired_day", False))
    if paired_day:
        tgt = _open_day_night(data.data_dir, tgt_cfg)
    else:
        target_labels = methods.target_labels(config)
        tgt = _open_split(data.data_dir, "target", tgt_cfg, with_label=target_labels)
        if target_labels:
            _check_target_labels(tgt, config)
    val = _open_split(data.data_dir, "val", val_cfg)
    # The model's class set against the data's (and the class set of classes='data' filled in).
    class_set.resolve(config, dict(source=src, target=getattr(tgt, "night", tgt), val=val))
    _check_crop(src, "source", src_cfg)
    _check_crop(tgt, "target", tgt_cfg)
    rcs = None
    if src_cfg.rcs:
        rcs = RcsConfig(
            temperature=src_cfg.rcs_temperature,
            min_pixels=src_cfg.rcs_min_pixels,
            min_crop_ratio=src_cfg.rcs_min_crop_ratio,
        )
    common = dict(process_index=p, process_count=n)
    try:
        source = pipeline.source_dataset(
            src,
            batch_size=src_bs,
            crop_size=tuple(src_cfg.crop_size),
            scale=tuple(src_cfg.scale) if src_cfg.scale else None,
            cat_max_ratio=src_cfg.cat_max_ratio,
            flip_prob=src_cfg.flip_prob,
            rcs=rcs,
            seed=config.seed,
            **common,
        )
    except ValueError as e:  # RCS: a class with no image above rcs_min_pixels
        raise ConfigError(f"data.source.rcs_min_pixels={src_cfg.rcs_min_pixels}: {e}") from e
    return dict(
        source=source,
        target=pipeline.target_dataset(
            tgt,
            batch_size=tgt_bs,
            crop_size=tuple(tgt_cfg.crop_size),
            scale=tuple(tgt_cfg.scale) if tgt_cfg.scale else None,
            flip_prob=tgt_cfg.flip_prob,
            seed=config.seed + 1,
            paired_keys=("day_image",) if paired_day else (),
            **common,
        ),
        val=pipeline.val_dataset(
            val,
            batch_size=val_bs,
            scale=tuple(val_cfg.scale) if val_cfg.scale else None,
            **common,
        ),
        sizes=dict(source=len(src), target=len(tgt), val=len(val)),
    )


def abstract_train_state(config: ml_collections.ConfigDict):
    """(model, optimizer, TrainState of ShapeDtypeStructs) of a config, nothing allocated."""
    model = methods.build_model(config)
    abstract_vars = segmentor.abstract_variables(model)
    optimizer = methods.make_optimizer(config, abstract_vars["params"])
    abstract = jax.eval_shape(lambda v: create_train_state(config, v, optimizer.tx), abstract_vars)
    return model, optimizer, abstract


def initial_variables(config, model) -> dict:
    """Random initialisation, or `config.init_from` (e.g. ImageNet MiT, any converter format).
    A method's auxiliary heads start from their random initialisation, except from a SePiCo
    checkpoint (`init_from.format='sepico'`), whose projection head the run continues: there a
    file without it stops with one line."""
    if not config.init_from.path:
        return segmentor.init_variables(model, jax.random.key(config.seed))
    if config.init_from.format == "sepico" and model.auxiliary_heads:
        _, variables = predict.load_model(
            config.model,
            config.init_from.path,
            "sepico",
            config.init_from.which,
            auxiliary_heads=dict(model.auxiliary_heads),
        )
        return variables
    _, variables = predict.load_model(
        config.model, config.init_from.path, config.init_from.format, config.init_from.which
    )
    if model.auxiliary_heads:
        initial = segmentor.init_variables(model, jax.random.key(config.seed))
        variables = {name: dict(collection) for name, collection in variables.items()}
        for name, collection in initial.items():
            if "auxiliary_head" in collection:
                variables.setdefault(name, {})["auxiliary_head"] = collection["auxiliary_head"]
    return variables


def _has_checkpoints(root: epath.Path) -> bool:
    folder = root / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _make_workdir(root: epath.Path, workdir: str) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # the processes may share the folder
            probe = root / ".pgpc_jax_write_check"
            probe.write_text("")
            probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} cannot be created or written: {e}") from e


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """`key (run X, now Y)` for every config field that differs from a run's config.json (a
    field the run's code did not have yet, empty now, is no change)."""
    old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
    return [
        f"{key} (run {old.get(key)!r}, now {new.get(key)!r})"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not (key not in old and new[key] in ([], "", None))
    ]


def _check_resumable(config, root: epath.Path, ckpts, abstract) -> None:
    """A workdir's checkpoint must hold this config's state (model, method), else stop before
    anything is written, naming the config fields that changed."""
    mismatch = ckpts.mismatch(abstract)
    if not mismatch:
        return
    saved = root / "config.json"
    changed = config_differences(json.loads(saved.read_text()), config) if saved.exists() else []
    raise ConfigError(
        f"{root} holds a run whose checkpoint does not fit this config ({'; '.join(mismatch)}). "
        + (f"Changed config fields: {', '.join(changed)}. " if changed else "")
        + "Resume with the run's own config, or use a new --workdir."
    )


def _all_finite(state: TrainState) -> jax.Array:
    """One boolean: every float of the parameters, statistics, teacher and method state."""
    trees = (state.params, state.batch_stats, state.opt_state, state.teacher_params)
    leaves = jax.tree.leaves((trees, state.method_state))
    leaves = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _quiet() -> bool:
    """The default: no INFO logs, no XLA compile alarms (`--verbosity=0` shows them)."""
    return logging.get_verbosity() < logging.INFO


def _evaluate(config, model, state, datasets, root: epath.Path, step, logger) -> dict[str, float]:
    """Evaluate the student on the validation split; log its metrics, the per-class IoU table
    (as text) and, for a few images, colour predictions next to the labels and the teacher's
    pseudo-labels (as TensorBoard images; the predictions also as PNG files)."""
    count, visuals = config.eval.num_visualizations, []
    names, colors = class_set.names_and_colors(config)
    settings = dict(
        num_classes=config.model.num_classes,
        class_names=names,
        class_colors=colors,
        mode=config.eval.mode,
        crop_size=tuple(config.eval.crop_size),
        stride=tuple(config.eval.stride),
        num_visualizations=count,
        class_weights=evaluation.class_weights_of(config),
    )
    progress = metrics_logging.Progress(
        f"evaluating step {step}:", datasets["sizes"]["val"], enabled=jax.process_index() == 0
    )
    with metrics_logging.without_compile_alarms(_quiet()):
        metrics, table = evaluation.evaluate(
            model,
            state.student_variables,
            iter(datasets["val"]),
            visualization_dir=str(root / "predictions" / f"step_{step:06d}"),
            visualizations=visuals,
            progress=progress,
            **settings,
        )
    _say(f"evaluation at step {step}:\n{table}")
    logger.log(step, metrics)
    logger.log_text(step, "eval/iou_table", scores.iou_markdown(metrics))
    images = {
        f"eval/prediction_label/{i}": np.concatenate([v["pred"], v["label"]], axis=1)
        for i, v in enumerate(visuals)
    }
    if count and state.teacher_params is not None:
        # The teacher's prediction on the same images: the pseudo-label it gives them (the
        # same compiled evaluation, run on the first batches only).
        batches = -(-count // config.data.val.batch_size)
        teacher_visuals = []
        evaluation.evaluate(
            model,
            {"params": state.teacher_params, "batch_stats": state.batch_stats},
            itertools.islice(iter(datasets["val"]), batches),
            visualizations=teacher_visuals,
            **settings,
        )
        images.update({f"eval/pseudo_label/{i}": v["pred"] for i, v in enumerate(teacher_visuals)})
    logger.log_images(step, images)
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train as `config` says, in `workdir` (resuming from its checkpoints); returns the final
    evaluation metrics."""
    check_config(config)
    primary = jax.process_index() == 0

    # Mesh: data parallel over all devices, state replicated.
    try:
        mesh = sharding.make_mesh(config.mesh.num_devices or None)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _say(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].device_kind} devices")

    # Data.
    datasets = _datasets(config, mesh)
    _say("images: " + ", ".join(f"{k} {v}" for k, v in datasets["sizes"].items()))

    # Model, optimizer, the state's structure.
    model, optimizer, abstract = abstract_train_state(config)
    _say(
        f"model: MiT-{config.model.backbone} + {config.model.head} head, "
        f"{segmentor.count_params(abstract.params) / 1e6:.2f} M parameters; "
        f"method {config.method or methods.DEFAULT}, {config.num_train_steps} steps"
    )

    # Workdir: the initial weights are read (a fresh run) and a resumed run's checkpoint is
    # checked against the config before anything is written.
    root = checkpointing.run_path(workdir)
    resuming = _has_checkpoints(root)
    variables = None if resuming else initial_variables(config, model)
    _make_workdir(root, workdir)
    ckpts = checkpointing.RunCheckpoints(root, keep=config.keep_checkpoints)
    try:
        if resuming:
            _check_resumable(config, root, ckpts, abstract)
            saved = root / "config.json"
            changed = (
                config_differences(json.loads(saved.read_text()), config) if saved.exists() else []
            )
            if changed:  # allowed (it fits the checkpoint), but said: config.json is replaced
                _say(f"note: resuming with config changes: {', '.join(changed)}")
        if primary:
            (root / "config.json").write_text(config.to_json_best_effort(indent=2))

        # The train state, restored with its data positions or initial, replicated.
        iterators = {
            name: pipeline.make_iterator(datasets[name], num_workers=config.data.num_workers)
            for name in ("source", "target")
        }
        if resuming:
            target = sharding.abstract_replicated(abstract, mesh)
            state, start = ckpts.restore(target, iterators, log=_say)
            _say(f"resumed from {root} at step {start}")
        else:
            state = create_train_state(config, variables, optimizer.tx)
            state, start = sharding.replicate(state, mesh), 0
        return _train_loop(
            config, model, optimizer, state, start, datasets, iterators, ckpts, mesh, root
        )
    finally:
        ckpts.close()


def _train_loop(config, model, optimizer, state, start, datasets, iterators, ckpts, mesh, root):
    # The step: jitted once, state donated.
    replicated = sharding.replicated(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(config, model, optimizer),
        in_shardings=(state_sharding, batch_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    all_finite = jax.jit(_all_finite, out_shardings=replicated)

    total = config.num_train_steps
    logger = metrics_logging.MetricsLogger(
        str(root), total, start_step=start, enabled=jax.process_index() == 0
    )
    # Batches go to the devices `data.prefetch` steps ahead; checkpoints record the position of
    # the batches the step consumed, so prefetching never changes a run.
    iterators = dict(iterators)
    for name in ("source", "target"):
        iterators[name] = prefetch.DevicePrefetcher(
            iterators[name], lambda b: sharding.global_batch(b, mesh), config.data.prefetch
        )
    src_iter, tgt_iter = iterators["source"], iterators["target"]
    step, metrics, timer = start, {}, time.time()
    in_flight, wait_s, waited_steps = None, 0.0, 0
    while step < total:
        # Whole batch dicts: a method may use a second view, a frame, or (an oracle) the label.
        src, tgt = next(src_iter), next(tgt_iter)
        if step == start:  # the first call compiles: say so, instead of XLA's slow-compile alarm
            _say(f"compiling the step of {config.method or methods.DEFAULT} ...")
            compile_start = time.time()
            with metrics_logging.without_compile_alarms(_quiet()):
                state, device_metrics = train_step(state, src, tgt)
            _say(f"compiled in {metrics_logging.format_duration(time.time() - compile_start)}")
        else:
            state, device_metrics = train_step(state, src, tgt)
        # The step runs on the devices: read the next batches meanwhile, then wait for the
        # previous step, so that at most two steps are in flight.
        src_iter.fill()
        tgt_iter.fill()
        if in_flight is not None:
            jax.block_until_ready(in_flight)
        in_flight = device_metrics
        wait = src_iter.pop_wait_s() + tgt_iter.pop_wait_s()
        if step > start:  # the first step's wait includes the pipeline's start: not counted
            wait_s, waited_steps = wait_s + wait, waited_steps + 1
        step += 1
        last = step == total
        log_now = step % config.log_every_steps == 0 or last
        save_now = step % config.checkpoint_every_steps == 0 or last
        eval_now = step % config.eval_every_steps == 0 or last
        if log_now or save_now or eval_now:
            # One fetch: the step's metrics and whether the new state is finite. Nothing
            # non-finite is ever saved, logged as best or evaluated.
            host, finite = sharding.to_host((device_metrics, all_finite(state)))
            host = {k: float(v) for k, v in host.items()}
            message = metrics_logging.non_finite_message(
                host, step, bool(finite), kept=ckpts.latest_step()
            )
            if message:
                raise metrics_logging.NonFiniteLossError(message)
        if log_now:
            # Host time reading and transferring input per step. A timing, not a function of
            # the run: `perf/`, so that every `train/` metric stays reproducible bit for bit.
            if waited_steps:
                host["perf/data_wait_ms"] = 1000 * wait_s / waited_steps
            wait_s, waited_steps = 0.0, 0
            logger.log(step, host)
        # Evaluate before the checkpoint: a run killed while evaluating resumes from an
        # earlier checkpoint and evaluates this step again, so no evaluation is lost.
        if eval_now:
            metrics = _evaluate(config, model, state, datasets, root, step, logger)
            ckpts.save_if_best(step, state, iterators, metrics)
        if save_now:
            ckpts.save(step, state, iterators)
    if not metrics:  # nothing left to train (a finished run re-run): evaluate what is there
        metrics = _evaluate(config, model, state, datasets, root, step, logger)
    logger.close()
    _say(f"done: {step - start} steps in {metrics_logging.format_duration(time.time() - timer)}")
    if jax.process_index() == 0:
        final = {k: float(v) for k, v in metrics.items() if np.isscalar(v)}
        (root / "final_metrics.json").write_text(metrics_logging.strict_json(final, indent=2))
    return metrics
