"""The training methods, one module each, and `METHODS`: name -> module.

A method module is a few small pure functions (`docs/method.md`, "Adding a method"):

  configure(config)          add the method's config group (if any) and its recipe changes
  validate(config)           raise ValueError naming the key and value of a bad setting
  needs_teacher(config)      keep and update the EMA teacher?
  needs_imnet(config)        keep the frozen ImageNet encoder?
  auxiliary_heads(config)    {name: flax module} extra heads on the encoder features
  init_state(config, params) the initial `method_state` (a pytree, or None)
  make_losses(config)        -> losses(ctx) -> ({name: loss}, new method_state, {name: metric})

and, optionally:

  start_steps(config)        {parameter path prefix: first step}: parameters the optimizer
                             leaves alone before that step (a head out of every backward pass)
  target_labels(config)      does the method read the target split's labels (pseudo-labels
                             made offline)? The trainer then opens them (default: no)
  RECIPES                    {recipe name: configure(config)}: named settings of the method,
                             chosen like a method (`configs/gta2cs.py:fda_sst`)

The generic step (`train_step.py`) looks the method up once, in Python, at trace time.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from pgpc_jax import optim
from pgpc_jax.methods import daformer, fda, pgpc, sepico, source_only
from pgpc_jax.models import segmentor

METHODS: dict[str, ModuleType] = {
    "source_only": source_only,
    "daformer": daformer,
    "pgpc": pgpc,
    "sepico": sepico,
    "fda": fda,
}
DEFAULT = "pgpc"
# Recipe name -> (method name, configure): a method's named settings (its module's `RECIPES`).
RECIPES: dict[str, tuple[str, Any]] = {
    recipe: (name, configure)
    for name, module in METHODS.items()
    for recipe, configure in getattr(module, "RECIPES", {}).items()
}


def get(name: str) -> ModuleType:
    """The module of method `name`, or a ValueError listing the methods."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def names() -> list[str]:
    """Every name a config takes as its argument: the methods and their recipes."""
    return [*METHODS, *RECIPES]


def configure(config, name: str | None = None):
    """Make `config` (a benchmark config) train method or recipe `name` (default PGPC): sets
    `config.method` (a recipe's method) and lets the method add its group and recipe. Returns
    `config`."""
    name = name or DEFAULT
    if name in RECIPES:
        method_name, configure_recipe = RECIPES[name]
        config.method = method_name
        configure_recipe(config)
        return config
    if name not in METHODS:
        raise ValueError(f"method={name!r}: expected one of {', '.join(names())}")
    config.method = name
    METHODS[name].configure(config)
    return config


def target_labels(config) -> bool:
    """Does the run's method train on the target split's labels (`target_labels`, optional)?"""
    return bool(getattr(get(config.method), "target_labels", lambda config: False)(config))


def build_model(config) -> segmentor.Segmentor:
    """The segmentor a run trains: the `model` group plus the method's auxiliary heads."""
    return segmentor.build_segmentor(config.model, get(config.method).auxiliary_heads(config))


def make_optimizer(config, params: Any) -> optim.Optimizer:
    """The run's optimizer: `optim.make_optimizer` with the `optimizer` group and the method's
    `start_steps` (parameters trained only from a step on)."""
    start_steps = getattr(get(config.method), "start_steps", lambda config: {})(config)
    return optim.make_optimizer(
        params, config.num_train_steps, **config.optimizer, start_steps=start_steps
    )
