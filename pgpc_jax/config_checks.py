"""Checks of a training config before anything runs or is written.

`check_config(config)` raises `ConfigError` with one line that names the config key, the value
and what is expected, so that `python -m pgpc_jax.main` can stop with that line (exit status 2)
before it creates the workdir, opens a dataset or compiles anything. Checks that need the data
(a crop larger than the scaled images) live next to the data in `train.py`.
"""

from __future__ import annotations

import math
import os
from typing import Any

from pgpc_jax import methods
from pgpc_jax.models import segmentor
from pgpc_jax.models.mit import MIT_VARIANTS


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


# Where the ImageNet MiT weights of the real configs come from (NVlabs SegFormer's release).
MIT_WEIGHTS_HINT = (
    "the ImageNet MiT weights are NVlabs SegFormer's mit_b*.pth (the 'ImageNet-1K pretrained "
    "weights' link of github.com/NVlabs/SegFormer, as DAFormer's README says: put them in "
    "pretrained/), or the Hugging Face nvidia/mit-b5 folder with --config.init_from.format=hf; "
    "--config.init_from.path='' trains from a random initialisation"
)


def _pair(value: Any, key: str, allow_empty: bool = False) -> tuple[int, int] | None:
    """(a, b) of positive ints, or None for an empty value when `allow_empty`."""
    if allow_empty and (value is None or len(value) == 0):
        return None
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        empty = " or () for none" if allow_empty else ""
        raise ConfigError(f"{key}={value!r}: expected a pair of positive integers{empty}")
    return int(value[0]), int(value[1])


def _positive_int(value: Any, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r}: expected a positive integer")


def _choice(value: Any, key: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {sorted(choices)}")


def _finite(value: Any, key: str, low: float = 0.0, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= low
    if not ok or (positive and value <= 0):
        what = "a positive finite number" if positive else f"a finite number >= {low}"
        raise ConfigError(f"{key}={value!r}: expected {what}")


def check_model(model: Any, prefix: str = "model", classes_from_data: bool = False) -> None:
    """The `model` group: known variants, positive sizes (`num_classes` may be 0 when
    `classes_from_data`: the count of the data, filled in at start-up)."""
    _choice(model.backbone, f"{prefix}.backbone", MIT_VARIANTS)
    _choice(model.head, f"{prefix}.head", segmentor.HEADS)
    _choice(model.dtype, f"{prefix}.dtype", segmentor.DTYPES)
    _choice(model.layer_norm, f"{prefix}.layer_norm", ("mmseg", "hf"))
    # A model group saved before the field existed (a run's config, a weights file) has none.
    _choice(model.get("remat", "none"), f"{prefix}.remat", segmentor.REMAT)
    for key in ("num_classes", "head_embed_dim", "head_channels"):
        if key == "num_classes" and classes_from_data and model[key] == 0:
            continue
        _positive_int(model[key], f"{prefix}.{key}")
    for key in ("dropout_rate", "drop_path_rate"):
        _finite(model[key], f"{prefix}.{key}")
        if model[key] >= 1:
            raise ConfigError(f"{prefix}.{key}={model[key]!r}: expected a rate in [0, 1)")


def _check_method(config) -> None:
    """`method` names a method, and the config carries that method's group and no other's (a
    `--config.method=` override would keep the old method's group and recipe)."""
    name = config.get("method", "")
    if name not in methods.METHODS:
        raise ConfigError(
            f"method={name!r}: expected one of {', '.join(methods.METHODS)}; choose it with the "
            "config's argument, e.g. --config configs/gta2cs.py:daformer"
        )
    stray = [m for m in methods.METHODS if m != name and m in config]
    if stray:
        raise ConfigError(
            f"method={name!r} but the config has the {stray[0]!r} group: the method was changed "
            f"by an override; choose it with the config's argument (--config FILE.py:{name})"
        )


def check_config(config: Any) -> None:
    """Raise `ConfigError` for the first value that cannot work (see the module docstring)."""
    from pgpc_jax import evaluation, predict

    _choice(config.get("classes", "cityscapes"), "classes", ("cityscapes", "data"))
    check_model(config.model, classes_from_data=config.get("classes") == "data")
    for key in ("num_train_steps", "log_every_steps", "eval_every_steps"):
        _positive_int(config[key], key)
    _positive_int(config.checkpoint_every_steps, "checkpoint_every_steps")
    _positive_int(config.keep_checkpoints, "keep_checkpoints")

    opt = config.optimizer
    _finite(opt.learning_rate, "optimizer.learning_rate", positive=True)
    for key in ("weight_decay", "head_lr_mult", "norm_decay_mult", "warmup_ratio", "min_lr"):
        _finite(opt[key], f"optimizer.{key}")
    _finite(opt.eps, "optimizer.eps", positive=True)
    for key in ("b1", "b2"):
        _finite(opt[key], f"optimizer.{key}")
        if opt[key] >= 1:
            raise ConfigError(f"optimizer.{key}={opt[key]!r}: expected a value in [0, 1)")
    if not isinstance(opt.warmup_steps, int) or opt.warmup_steps < 0:
        raise ConfigError(f"optimizer.warmup_steps={opt.warmup_steps!r}: expected an int >= 0")
    prefetch = config.data.get("prefetch", 0)
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ConfigError(
            f"data.prefetch={prefetch!r}: expected an int >= 0 (batches put on the devices "
            "ahead of the step; 0 reads each batch when the step needs it)"
        )

    data = config.data
    for name in ("source", "target", "val"):
        group = data[name]
        _positive_int(group.batch_size, f"data.{name}.batch_size")
        _pair(group.scale, f"data.{name}.scale", allow_empty=True)
        if not group.dataset or not group.split:
            raise ConfigError(f"data.{name}: dataset and split must be set")
    for name in ("source", "target"):
        _pair(data[name].crop_size, f"data.{name}.crop_size")
        _finite(data[name].flip_prob, f"data.{name}.flip_prob")

    target = data.target
    if target.get("paired_day", False) and (
        not str(target.dataset).startswith("dark_zurich/") or target.split != "train_night"
    ):
        raise ConfigError(
            f"data.target.paired_day=True: only Dark Zurich's train_night split has paired day "
            f"images, not data.target.dataset={target.dataset!r} split={target.split!r}; use "
            "dataset 'dark_zurich/<config>' with split 'train_night', or paired_day=False"
        )

    _choice(config.eval.mode, "eval.mode", evaluation.MODES)
    _pair(config.eval.crop_size, "eval.crop_size")
    _pair(config.eval.stride, "eval.stride")
    _finite(config.eval.class_reweight, "eval.class_reweight")
    if config.eval.class_reweight > 0 and config.model.num_classes != 19:
        raise ConfigError(
            f"eval.class_reweight={config.eval.class_reweight!r} weighs the 19 Cityscapes "
            f"classes by their Dark Zurich frequencies, but model.num_classes="
            f"{config.model.num_classes}; set eval.class_reweight=0"
        )

    _check_method(config)
    uda = config.uda
    _choice(uda.pseudo_weight, "uda.pseudo_weight", ("scalar", "pixel"))
    _finite(uda.ema_alpha, "uda.ema_alpha")
    if uda.ema_alpha > 1:
        raise ConfigError(f"uda.ema_alpha={uda.ema_alpha!r}: expected a value in [0, 1]")
    _finite(uda.fd_lambda, "uda.fd_lambda")
    try:
        methods.get(config.method).validate(config)
    except ValueError as e:
        raise ConfigError(str(e)) from e

    init = config.init_from
    if init.path:
        _choice(init.format, "init_from.format", predict.WEIGHT_FORMATS)
        if "://" not in init.path and not os.path.exists(os.path.expanduser(init.path)):
            hint = MIT_WEIGHTS_HINT if init.format in ("mit", "hf") else "check the path"
            raise ConfigError(f"init_from.path={init.path!r} does not exist: {hint}")
