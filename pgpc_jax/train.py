"""train_and_evaluate: the whole run, top to bottom.

mesh -> data -> model and initial weights -> train state and shardings -> the jitted step ->
checkpoints (resume) -> the loop (log, evaluate, checkpoint) -> final evaluation.

The step itself (`train_step.py`) is a pure function of (state, source batch, target batch);
everything with side effects lives here.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from data_pipelines import pipeline, sources
from data_pipelines.rcs import RcsConfig
from pgpc_jax import checkpointing, evaluation, metrics_logging, optim, predict, sharding
from pgpc_jax.models import segmentor
from pgpc_jax.train_state import create_train_state
from pgpc_jax.train_step import make_train_step


def _datasets(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
    """The source / target training pipelines and the validation pipeline of this process."""
    data, p, n = config.data, jax.process_index(), jax.process_count()
    src_cfg, tgt_cfg, val_cfg = data.source, data.target, data.val
    src_bs = sharding.check_batch_size(src_cfg.batch_size, mesh, "data.source.batch_size")
    tgt_bs = sharding.check_batch_size(tgt_cfg.batch_size, mesh, "data.target.batch_size")
    val_bs = sharding.check_batch_size(val_cfg.batch_size, mesh, "data.val.batch_size")
    src = sources.open_split(data.data_dir, src_cfg.dataset, src_cfg.split)
    tgt = sources.open_split(data.data_dir, tgt_cfg.dataset, tgt_cfg.split, with_label=False)
    val = sources.open_split(data.data_dir, val_cfg.dataset, val_cfg.split)
    rcs = None
    if src_cfg.rcs:
        rcs = RcsConfig(
            temperature=src_cfg.rcs_temperature,
            min_pixels=src_cfg.rcs_min_pixels,
            min_crop_ratio=src_cfg.rcs_min_crop_ratio,
        )
    common = dict(process_index=p, process_count=n)
    return dict(
        source=pipeline.source_dataset(
            src,
            batch_size=src_bs,
            crop_size=tuple(src_cfg.crop_size),
            scale=tuple(src_cfg.scale) if src_cfg.scale else None,
            cat_max_ratio=src_cfg.cat_max_ratio,
            flip_prob=src_cfg.flip_prob,
            rcs=rcs,
            seed=config.seed,
            **common,
        ),
        target=pipeline.target_dataset(
            tgt,
            batch_size=tgt_bs,
            crop_size=tuple(tgt_cfg.crop_size),
            scale=tuple(tgt_cfg.scale) if tgt_cfg.scale else None,
            flip_prob=tgt_cfg.flip_prob,
            seed=config.seed + 1,
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


def initial_variables(config, model) -> dict:
    """Random initialisation, or `config.init_from` (e.g. ImageNet MiT, any converter format)."""
    if config.init_from.path:
        _, variables = predict.load_model(
            config.model, config.init_from.path, config.init_from.format, config.init_from.which
        )
        return variables
    return segmentor.init_variables(model, jax.random.key(config.seed))


def _evaluate(config, model, state, datasets, workdir, step) -> dict[str, float]:
    vis_dir = os.path.join(workdir, "predictions", f"step_{step:06d}")
    result = evaluation.evaluate(
        model,
        state.student_variables,
        iter(datasets["val"]),
        num_classes=config.model.num_classes,
        mode=config.eval.mode,
        crop_size=tuple(config.eval.crop_size),
        stride=tuple(config.eval.stride),
        num_visualizations=config.eval.num_visualizations,
        visualization_dir=vis_dir,
    )
    metrics, table = result
    print(f"evaluation at step {step}:\n{table}", flush=True)
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train as `config` says, in `workdir` (resuming from its checkpoints); returns the final
    evaluation metrics."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    # Mesh: data parallel over all devices, state replicated.
    mesh = sharding.make_mesh(config.mesh.num_devices or None)
    logging.info(
        "mesh %s over %d devices (%s)", mesh.shape, mesh.devices.size, jax.devices()[0].device_kind
    )

    # Data.
    datasets = _datasets(config, mesh)
    logging.info("datasets: %s", datasets["sizes"])

    # Model, optimizer, state.
    model = segmentor.build_segmentor(config.model)
    abstract_vars = segmentor.abstract_variables(model)
    tx = optim.make_optimizer(abstract_vars["params"], config.num_train_steps, **config.optimizer)
    abstract = jax.eval_shape(lambda v: create_train_state(config, v, tx), abstract_vars)
    ckpts = checkpointing.RunCheckpoints(workdir, keep=config.keep_checkpoints)
    n_params = segmentor.count_params(abstract.params)
    logging.info(
        "model: MiT-%s + %s head, %.2f M parameters",
        config.model.backbone,
        config.model.head,
        n_params / 1e6,
    )

    src_iter = pipeline.make_iterator(datasets["source"], num_workers=config.data.num_workers)
    tgt_iter = pipeline.make_iterator(datasets["target"], num_workers=config.data.num_workers)
    start = ckpts.latest_step()
    if start is not None:
        state, data_state = ckpts.restore(abstract)
        src_iter.set_state(data_state["source"])
        tgt_iter.set_state(data_state["target"])
        logging.info("resumed from step %d", start)
        print(f"resumed from {workdir} at step {start}", flush=True)
    else:
        state = create_train_state(config, initial_variables(config, model), tx)
    state = sharding.replicate(state, mesh)

    # The step: jitted once, state donated.
    step_fn = make_train_step(config, model, tx)
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    logger = metrics_logging.MetricsLogger(workdir, config.num_train_steps)
    step = int(jax.device_get(state.step))
    metrics = {}
    timer = time.time()
    while step < config.num_train_steps:
        src = sharding.global_batch(next(src_iter), mesh)
        tgt = sharding.global_batch({"image": next(tgt_iter)["image"]}, mesh)
        state, device_metrics = train_step(state, src, tgt)
        step += 1
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
            host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            metrics_logging.check_finite(host, step)
            logger.log(step, host)
        if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
            ckpts.save(
                step, state, {"source": src_iter.get_state(), "target": tgt_iter.get_state()}
            )
        if step % config.eval_every_steps == 0 or step == config.num_train_steps:
            metrics = _evaluate(config, model, state, datasets, workdir, step)
            logger.log(step, metrics)
            ckpts.save_if_best(
                step,
                state,
                {"source": src_iter.get_state(), "target": tgt_iter.get_state()},
                metrics,
            )
    if not metrics:  # nothing left to train (a finished run re-run): evaluate what is there
        metrics = _evaluate(config, model, state, datasets, workdir, step)
    ckpts.close()
    logger.close()
    logging.info("done in %.1f s", time.time() - timer)
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump({k: float(v) for k, v in metrics.items() if np.isscalar(v)}, f, indent=2)
    return metrics
