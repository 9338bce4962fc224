"""The training step, generic over methods: one pure function
`train_step(state, src, tgt) -> (state, metrics)`.

  1. the EMA teacher update from the current student (a copy at step 0), when the method has a
     teacher (DAFormer's DACS order: the teacher is updated first);
  2. the method's losses (`methods/<name>.py`) on the whole source and target batch dicts,
     given the forwards bound to this step's parameters (`methods.context`);
  3. one gradient of their sum (DAFormer backpropagates each loss and accumulates: the same),
     the optimizer update, the BatchNorm statistics the student's last forward left, and the
     method's new state;
  4. the metrics: every loss, the method's statistics, the total, the gradient norm and the
     learning rate, under `train/`.

A method is looked up once, at trace time; adding one never edits this file.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from pgpc_jax import methods, optim
from pgpc_jax.methods.context import Context, Student, bind_imnet, bind_teacher
from pgpc_jax.train_state import TrainState
from pgpc_jax.uda import teacher


def make_train_step(config, model, optimizer: optim.Optimizer) -> Callable:
    """Close over plain hyperparameters (never the ConfigDict) and return the pure step.

    Args:
      config: the run's config (read here, once).
      model: the segmentor, with the method's auxiliary heads (`methods.build_model`).
      optimizer: `optim.make_optimizer(...)`: the transformation and its schedule.
    """
    method = methods.get(config.method)
    method.validate(config)
    losses_of = method.make_losses(config)
    use_teacher, use_imnet = method.needs_teacher(config), method.needs_imnet(config)
    ema_alpha = float(config.uda.ema_alpha)

    def train_step(state: TrainState, src: dict, tgt: dict):
        teacher_params = state.teacher_params
        if use_teacher:
            teacher_params = teacher.update_teacher(
                state.teacher_params, state.params, state.step, ema_alpha
            )

        def loss_fn(params):
            ctx = Context(
                src=src,
                tgt=tgt,
                step=state.step,
                rng=jax.random.fold_in(state.rng, state.step),
                method_state=state.method_state,
                student=Student(model, params, state.batch_stats),
                teacher=bind_teacher(model, teacher_params, state.batch_stats)
                if use_teacher
                else None,
                imnet=bind_imnet(model, state.imnet_params) if use_imnet else None,
            )
            losses, method_state, metrics = losses_of(ctx)
            return sum(losses.values()), (losses, ctx.student.batch_stats, method_state, metrics)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        losses, batch_stats, method_state, method_metrics = aux
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            teacher_params=teacher_params,
            method_state=method_state,
        )
        metrics = {f"train/{k}": v for k, v in {**losses, **method_metrics}.items()}
        metrics["train/loss"] = loss
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/learning_rate"] = optimizer.learning_rate(state.step)
        return new_state, metrics

    return train_step
