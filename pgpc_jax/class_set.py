"""The class set of a run: its class names, their colours and their count.

Two label spaces:
  * `config.classes = 'cityscapes'`: the 19 Cityscapes classes and colours
    (`data_pipelines.labels`); every benchmark config. The datasets must carry those 19 names.
  * `config.classes = 'data'`: the class set of the builds (`metadata.json`: `class_names`,
    `palette`), e.g. a `folder` pair (`configs/folder.py`). At start-up `resolve` copies the names
    and colours into `config.class_names` / `config.class_colors` and, when `model.num_classes`
    is 0, the count into it, so the run's `config.json` carries the class set to every later
    command (evaluate, predict, export, pseudo-label) without the build.

Either way `resolve` fails at start-up, naming both sides, when the model's class count or the
label space differs from a dataset's, or two datasets disagree: a 19-class model on an 11-class
build would otherwise train (labels >= the class count silently give no loss and no score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from data_pipelines import labels
from pgpc_jax.config_checks import ConfigError

LABEL_SPACES = ("cityscapes", "data")
# Names shown in an error before the list is cut.
_SHOWN = 8


def is_cityscapes(names: Sequence[str]) -> bool:
    """Whether `names` are the 19 Cityscapes classes in train-id order (mIoU16 / mIoU13 and the
    Cityscapes colours exist only for them)."""
    return tuple(names) == labels.CLASSES


def default_colors(names: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    """The colours of a class set that names none: Cityscapes' for its classes, else generated."""
    if is_cityscapes(names):
        return labels.PALETTE
    return tuple(tuple(int(v) for v in c) for c in labels.generated_palette(len(names)))


def names_and_colors(config: Any) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """(class names, RGB colours) of a config or a run's config.

    Raises:
      ConfigError: `classes='data'` in a config whose class set was never filled in (it is, at
        the start of training, from the datasets).
    """
    names = tuple(config.get("class_names", ()) or ())
    if names:
        colors = tuple(tuple(int(v) for v in c) for c in config.get("class_colors", ()) or ())
        return names, colors if len(colors) == len(names) else default_colors(names)
    space = config.get("classes", "cityscapes")
    if space == "cityscapes":
        return labels.CLASSES, labels.PALETTE
    raise ConfigError(
        f"classes={space!r} and the config names no classes (class_names): a training run fills "
        "them in from its datasets; give the run's directory (its config.json), not the config file"
    )


def _shown(names: Sequence[str]) -> str:
    cut = ", ".join(names[:_SHOWN])
    return f"({cut}{', ...' if len(names) > _SHOWN else ''})"


def _describe(key: str, source: Any) -> str:
    names = source.class_names
    return f"data.{key}.dataset={source_name(source)!r} has {len(names)} classes {_shown(names)}"


def source_name(source: Any) -> str:
    """'name/config' of an opened split (for messages)."""
    builder_dir = getattr(source, "builder_dir", "")
    parts = str(builder_dir).rstrip("/").split("/")
    return "/".join(parts[-3:-1]) if len(parts) >= 3 else str(builder_dir)


def resolve(config: Any, splits: Mapping[str, Any]) -> None:
    """Checks the config's class set against the opened datasets and fills it in ('data').

    Args:
      config: the training config (its values may be set; it may be locked).
      splits: {'source' | 'target' | 'val': an opened split} with `class_names` (and `palette`).

    Raises:
      ConfigError: naming the config key and the dataset when they disagree.
    """
    space = config.classes
    if space not in LABEL_SPACES:
        raise ConfigError(f"classes={space!r}: expected one of {', '.join(LABEL_SPACES)}")
    first_key, first = next(iter(splits.items()))
    names = tuple(first.class_names)
    for key, source in splits.items():
        if tuple(source.class_names) != names:
            raise ConfigError(
                f"{_describe(first_key, first)} but {_describe(key, source)}: the domains must "
                "share one class set (build them with the same class file)"
            )
    keys = [name.replace(" ", "_") for name in names]  # their metric keys, eval/iou/<key>
    twins = sorted({n for n, k in zip(names, keys) if keys.count(k) > 1})
    if twins:
        raise ConfigError(
            f"{_describe(first_key, first)}: the class names {twins} become the same metric name "
            "(spaces read as underscores); rename one in the class file and rebuild"
        )
    if space == "cityscapes" and not is_cityscapes(names):
        raise ConfigError(
            f"classes='cityscapes' but {_describe(first_key, first)}, not the 19 Cityscapes "
            "classes; train on your own class set with configs/folder.py (or set "
            "--config.classes=data --config.model.num_classes=0)"
        )
    count = config.model.num_classes
    if count not in (0, len(names)):
        raise ConfigError(
            f"model.num_classes={count} but {_describe(first_key, first)}; set "
            f"--config.model.num_classes={len(names)} (or 0: the number of classes of the data)"
        )
    if count == 0:
        config.model.num_classes = len(names)
    if space == "data":
        palette = getattr(first, "palette", None)
        colors = tuple(tuple(int(v) for v in c) for c in palette or default_colors(names))
        config.class_names = names
        config.class_colors = colors
    _check_class_ids(config, len(names))


def _check_class_ids(config: Any, num_classes: int) -> None:
    """Config fields that name classes by index must stay inside the class set."""
    uda = config.get("uda")
    if uda is None or not uda.fd_lambda:
        return
    outside = [c for c in uda.fd_classes if not 0 <= c < num_classes]
    if outside:
        raise ConfigError(
            f"uda.fd_classes={tuple(uda.fd_classes)} names classes {outside} but the data has "
            f"{num_classes} classes; list the indices of your thing classes, or set "
            "uda.fd_lambda=0 (no ImageNet feature distance)"
        )


def meta_fields(config: Any) -> dict[str, Any]:
    """The class set as saved in a weights directory's `model.json` meta (`classes`, and for
    classes='data' the names and colours)."""
    meta = {"classes": config.get("classes", "cityscapes")}
    if config.get("class_names"):
        names, colors = names_and_colors(config)
        meta["class_names"] = list(names)
        meta["class_colors"] = [list(c) for c in colors]
    return meta


def _stored_class_set(path: str) -> tuple[dict, str] | None:
    """(the class-set fields, where they were read) of a run or a weights directory; None for
    other weights (a PyTorch or HF checkpoint carries no class set we read)."""
    from pgpc_jax import checkpointing, weights  # the command layer; imported where needed

    found = weights.find_run(path)
    if found is not None:
        run = weights.read_run_config(found.root)
        fields = {k: run.get(k) for k in ("classes", "class_names", "class_colors")}
        fields["num_classes"] = run.model.num_classes
        return fields, str(found.root / "config.json")
    if checkpointing.is_weights_dir(path):
        stored = checkpointing.read_model_file(path)
        fields = dict(stored.get("meta", {}))
        fields["num_classes"] = stored.get("model", {}).get("num_classes")
        return fields, f"{path}/{checkpointing.MODEL_FILE}"
    return None


def adopt_from_weights(config: Any, paths: Sequence[str]) -> None:
    """The class set of the trained weights a command reads (evaluate, predict, pseudo-label).

    A config with classes='data' (`configs/folder.py`) names no classes before training: they
    come from the weights' run (its config.json) or weights directory (its model.json), and so
    does `model.num_classes` when it is 0. Weights trained on another class set than the
    config's are an error naming both.

    Raises:
      ConfigError: a class-set mismatch, or classes='data' with weights that carry none.
    """
    for path in paths:
        stored = _stored_class_set(path)
        if stored is None:
            continue
        fields, where = stored
        theirs, _ = names_and_colors(fields)
        if config.classes == "data" and not config.get("class_names"):
            config.class_names = theirs
            config.class_colors = names_and_colors(fields)[1]
        ours, _ = names_and_colors(config)
        if theirs != ours:
            raise ConfigError(
                f"{where} names {len(theirs)} classes {_shown(theirs)} but the config "
                f"{len(ours)} {_shown(ours)}; use the config the weights were trained with"
            )
        if config.model.num_classes == 0:
            config.model.num_classes = int(fields["num_classes"] or len(theirs))
    if config.model.num_classes == 0 or (config.classes == "data" and not config.class_names):
        raise ConfigError(
            "classes='data' (the class set of the data) but the weights are not a training run "
            "or weights directory that records it; give the run directory, or set "
            "--config.model.num_classes=K and --config.class_names='(\"name\", ...)'"
        )
