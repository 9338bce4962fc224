"""AdamW with DAFormer's parameter groups and mmcv's poly schedule with linear warm-up.

Mirrors, for DAFormer's configs (`_base_/schedules/adamw.py`, `_base_/schedules/poly10warm.py`,
`optimizer.paramwise_cfg.custom_keys` of the DAFormer configs):

* mmcv 1.3.x `PolyLrUpdaterHook.get_lr` (`mmcv/runner/hooks/lr_updater.py`, by iteration):
  regular = (base - min_lr) * (1 - t / T) ** power + min_lr, t the 0-based iteration, T the
  number of iterations; for t < warm-up `get_warmup_lr('linear')` scales that poly-decayed
  rate by 1 - (1 - t / W) * (1 - ratio). Each parameter group runs this from its own base
  rate (its `initial_lr`), so with min_lr > 0 the head's rate is not exactly 10x the encoder's.
* mmcv `DefaultOptimizerConstructor.add_params`: the custom keys are sorted alphabetically, then
  by length, longest first; a parameter takes the first key that is a substring of its torch
  name `<module path>.<weight|bias>` and gets lr = base * lr_mult, weight decay =
  base_wd * decay_mult. DAFormer's keys: 'head' (lr_mult 10), 'pos_block' (decay_mult 0, no
  such parameter in MiT) and 'norm' (decay_mult 0). So every `decode_head.*` parameter (its BN
  included) has 10x lr and the full decay, encoder parameters whose name contains 'norm' have
  no decay, all other encoder parameters (biases included) decay at 0.01.
* torch `AdamW`: p <- p * (1 - lr * wd), then the Adam step with eps added after the bias-
  corrected square root. That is `optax.adamw` (decay scaled by the learning rate, so the head's
  decay is also 10x), run per group through `optax.multi_transform`.

Beyond the reference: steps past `num_steps` keep the final rate instead of a negative base of
the power (mmcv never gets there).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from pgpc_jax.torch_names import canonical_layout

DEFAULT_GROUP = "default"


def learning_rate(
    step: jax.Array | int,
    base_lr: float = 6e-5,
    num_steps: int = 40000,
    warmup_steps: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr: float = 0.0,
) -> jax.Array:
    """mmcv 1.3.x poly schedule with linear warm-up of the poly-decayed rate at a 0-based step.

    Written so that float32 keeps ~1e-7 relative accuracy everywhere: 1 - t/T is computed as
    (T - t) / T (exact in the numerator), and the warm-up factor 1 - (1 - t/W)(1 - ratio) as
    ratio + (1 - ratio) * t / W (no cancellation near t = 0).

    Returns:
      float32 scalar learning rate.
    """
    t = jnp.minimum(jnp.asarray(step, jnp.float32), float(num_steps))
    coeff = ((num_steps - t) / num_steps) ** power
    regular = (base_lr - min_lr) * coeff + min_lr
    if warmup_steps <= 0:
        return regular
    warm = regular * (warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps)
    return jnp.where(t < warmup_steps, warm, regular)


def custom_keys(head_lr_mult: float = 10.0, norm_decay_mult: float = 0.0) -> dict[str, dict]:
    """DAFormer's `paramwise_cfg.custom_keys` with the two multipliers as arguments."""
    return {
        "head": {"lr_mult": head_lr_mult},
        "pos_block": {"decay_mult": 0.0},
        "norm": {"decay_mult": norm_decay_mult},
    }


def match_custom_key(name: str, keys: Mapping[str, Any]) -> str:
    """The custom key mmcv picks for the torch parameter `name`, or `DEFAULT_GROUP`.

    mmcv: sort the keys alphabetically, then by length (longest first, stable), and take the
    first key that is a substring of the name.
    """
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in name:
            return key
    return DEFAULT_GROUP


def param_group_labels(params: Any, keys: Mapping[str, Any]) -> Any:
    """A tree like `params` whose leaves are each parameter's group (custom key or 'default').

    The matching uses the torch name of each parameter (`backbone.block1.0.attn.norm.weight`,
    `decode_head.fuse_layer.bottleneck.bn.bias`), from `pgpc_jax.torch_names`. A method's
    auxiliary heads are `auxiliary_head.<name>.*` there, so 'head' gives them the head rule, as
    mmseg's `auxiliary_head.*` (their norms included: 'head' and 'norm' tie on length and
    'head' sorts first).
    """
    layout = canonical_layout({"params": params})
    torch_name = {path: key for key, (_, path, _) in layout.items()}
    flat = traverse_util.flatten_dict(dict(params))
    labels = {path: match_custom_key(torch_name[path], keys) for path in flat}
    return traverse_util.unflatten_dict(labels)


class Optimizer(NamedTuple):
    """The optimizer and its schedule, built once from the `optimizer` config group.

    Attributes:
      tx: AdamW over mmcv's parameter groups (`tx.init(params)`, `tx.update(...)`).
      learning_rate: step -> float32 rate of the default (encoder) group, the rate a run logs;
        the same function the default group's AdamW uses.
    """

    tx: optax.GradientTransformation
    learning_rate: Callable[[jax.Array | int], jax.Array]


def make_optimizer(
    params: Any,
    num_steps: int,
    learning_rate: float = 6e-5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    head_lr_mult: float = 10.0,
    norm_decay_mult: float = 0.0,
    warmup_steps: int = 1500,
    warmup_ratio: float = 1e-6,
    poly_power: float = 1.0,
    min_lr: float = 0.0,
    start_steps: Mapping[str, int] | None = None,
) -> Optimizer:
    """AdamW over mmcv's parameter groups, each with its own poly + warm-up schedule.

    The keyword names are those of the `optimizer` config group, so a trainer calls
    `make_optimizer(params, config.num_train_steps, **config.optimizer)`.

    Args:
      params: the student parameter tree {'backbone', 'decode_head'} (arrays or shapes).
      num_steps: total training iterations T of the poly schedule.
      learning_rate: base rate of the encoder groups (mmcv `optimizer.lr`).
      b1, b2, eps: Adam moments and epsilon (torch defaults as DAFormer: 0.9, 0.999, 1e-8).
      weight_decay: decoupled decay (mmcv `optimizer.weight_decay`).
      head_lr_mult: lr multiplier of parameters whose torch name contains 'head'.
      norm_decay_mult: decay multiplier of parameters whose torch name contains 'norm'.
      warmup_steps, warmup_ratio, poly_power, min_lr: the schedule of `learning_rate()`.
      start_steps: {parameter path prefix ('auxiliary_head/projection'): first step}: those
        parameters are left out of the optimizer before their first step, as torch's AdamW
        skips parameters without a gradient (a head out of every backward pass): no update, no
        weight decay, no Adam state. From that step they are updated with a fresh Adam state
        (bias correction from 1) at the global step's learning rate (`from_step`).

    Returns:
      `Optimizer(tx, learning_rate)`: the optax transformation (its count starts at 0, the rate
      of mmcv iteration 0) and the default group's schedule.
    """
    keys = custom_keys(head_lr_mult, norm_decay_mult)
    labels = _delayed_labels(param_group_labels(params, keys), start_steps or {})
    transforms, schedules = {}, {}
    # Sorted: a set's order follows Python's string hashing, which changes from process to
    # process, and so would the traced program (and the compilation cache would never hit).
    for label in sorted(set(jax.tree.leaves(labels))):
        group, _, start = label.partition(_DELAY)
        start = int(start or 0)
        options = keys.get(group, {})
        base = learning_rate * options.get("lr_mult", 1.0)
        decay = weight_decay * options.get("decay_mult", 1.0)

        # A delayed group counts its own updates from its first step: its rate is the one of
        # the global step `count + start`.
        def schedule(count, base=base, start=start):
            step = count + start if start else count
            return _schedule(step, base, num_steps, warmup_steps, warmup_ratio, poly_power, min_lr)

        adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=decay)
        if start:
            transforms[label] = from_step(start, adamw)
        else:
            schedules[group] = schedule
            transforms[label] = adamw
    default = schedules.get(DEFAULT_GROUP) or (
        lambda count: _schedule(
            count, learning_rate, num_steps, warmup_steps, warmup_ratio, poly_power, min_lr
        )
    )
    return Optimizer(optax.multi_transform(transforms, labels), default)


_DELAY = "@"  # group label of parameters delayed to a first step: '<group>@<step>'


def _delayed_labels(labels: Any, start_steps: Mapping[str, int]) -> Any:
    """`labels` with the parameters under each prefix of `start_steps` (a positive step)
    relabelled '<group>@<step>'."""
    prefixes = {}
    for prefix, start in start_steps.items():
        if int(start) < 0:
            raise ValueError(f"start step of {prefix!r} is {start}: expected an integer >= 0")
        if int(start) > 0:
            prefixes[tuple(prefix.strip("/").split("/"))] = int(start)
    flat = traverse_util.flatten_dict(dict(labels))
    for prefix in prefixes:
        if not any(path[: len(prefix)] == prefix for path in flat):
            raise ValueError(f"start step for {'/'.join(prefix)!r}: no such parameters")
    for path, group in flat.items():
        for prefix, start in prefixes.items():
            if path[: len(prefix)] == prefix:
                flat[path] = f"{group}{_DELAY}{start}"
    return traverse_util.unflatten_dict(flat)


class FromStepState(NamedTuple):
    """`from_step`'s state: the global step count and the inner state (untouched before the
    first step)."""

    count: jax.Array
    inner: Any


def from_step(start: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` applied from the `start`-th update on (0-based); before it the updates are zero
    and `inner`'s state stays as initialised, so its own count (bias correction, schedule)
    starts at the first applied update."""

    def init(params):
        return FromStepState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        def run(_):
            return inner.update(updates, state.inner, params)

        def skip(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner

        new_updates, new_inner = jax.lax.cond(state.count >= start, run, skip, None)
        return new_updates, FromStepState(optax.safe_int32_increment(state.count), new_inner)

    return optax.GradientTransformation(init, update)


# `make_optimizer`'s argument `learning_rate` shadows the function inside it.
_schedule = learning_rate
