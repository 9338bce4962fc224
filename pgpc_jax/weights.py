"""Loading a model's weights from any source the command-line tools accept.

  model, variables = weights.load_model(config.model, "weights/gta", "flax")
  model, variables = weights.load_model(config.model, "runs/gta2cs", "flax")  # a run: auto-detected
  model, variables = weights.load_model(config.model, "runs/gta2cs/best", "run", "ema_model")
  config, state, step = weights.load_run("runs/gta2cs", best=True)
  model, [v1, v2] = weights.load_models(config.model, ["runs/a", "runs/b"])  # an ensemble

Sources (`--weights` / `--weights-format` of `predict` and `evaluate`, `init_from` of a config):

  flax       a weights directory (`convert to-flax`, `export --format flax`); the default format
  run        a training run of `python -m pgpc_jax.main`: RUN (its latest checkpoint), RUN/best (the
             best one), RUN/checkpoints/<N> (step N) or RUN/best/<N>. A path of that shape is read
             as a run when the format is left at `flax`.
  mit, mmseg, hf, daformer, sepico   PyTorch / HF checkpoints, converted on the fly
             (`convert.to_flax`); sepico is SePiCo's layout, whose projection head is the
             auxiliary head `projection`

`which` picks the network, with DAFormer's names: 'model' the student (the default; what
DAFormer's tools/test.py evaluates), 'ema_model' the EMA teacher (a run's `teacher_params`, or
`ema_model.*` of a DAFormer or SePiCo checkpoint), 'imnet_model' DAFormer's ImageNet copy (DAFormer
checkpoints only). A run's teacher has no BatchNorm running statistics of its own: DAFormer's
teacher runs BatchNorm in train mode (batch statistics), so a run's teacher is paired with the
student's running statistics, the only ones the run keeps (a note is printed).

Every source must describe the config's model (backbone, head, widths, classes, LayerNorm
convention); a difference is one error naming the differing `model.*` fields.

Auxiliary heads (a method's extra heads, `auxiliary_head/<name>`): `load_model(...,
auxiliary_heads={name: module})` builds the model with them and reads them from any source that
has them; a source without one of them is a one-line error naming it, unless
`missing_auxiliary='init'` (training's `init_from`) keeps its initialisation. A source's
auxiliary heads that the model lacks (a SePiCo run, an mmseg checkpoint evaluated with the plain
segmentor) are ignored with one `note:` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from etils import epath

from pgpc_jax import checkpointing, convert
from pgpc_jax.models import segmentor
from pgpc_jax.torch_names import FORMATS, MISSING_AUXILIARY

WEIGHT_FORMATS = ("flax", "run", *sorted(FORMATS))
WHICH = ("model", "ema_model", "imnet_model")
# The model fields a set of weights fixes: the shapes, and the LayerNorm eps convention (same
# shapes, different function).
MODEL_KEYS = ("backbone", "head", "num_classes", "head_embed_dim", "head_channels", "layer_norm")
TEACHER_NOTE = (
    "the teacher has no BatchNorm running statistics of its own (DAFormer's teacher runs "
    "BatchNorm in train mode); it is paired with the student's running statistics"
)


class WeightsError(checkpointing.CheckpointError):
    """Weights that cannot be loaded for this config: not a run, another model, bad `which`."""


# ------------------------------------------------------------------------------------------------
# Training runs.


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """Which checkpoint of a run a path names: `step` None is the latest (the best with
    `best`)."""

    root: epath.Path
    step: int | None = None
    best: bool = False


def _is_run_root(path: epath.Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "checkpoints").is_dir() or (path / "best").is_dir()
    )


def find_run(path: str | os.PathLike) -> RunCheckpoint | None:
    """The run checkpoint a path names: RUN, RUN/best, RUN/checkpoints, RUN/checkpoints/<N>,
    RUN/best/<N> (RUN holds config.json and checkpoints/ or best/); None for any other path."""
    path = checkpointing.run_path(path)
    if _is_run_root(path):
        return RunCheckpoint(path)
    parent = path.parent
    if path.name in ("checkpoints", "best") and _is_run_root(parent):
        return RunCheckpoint(parent, best=path.name == "best")
    if path.name.isdigit() and parent.name in ("checkpoints", "best"):
        if _is_run_root(parent.parent):
            return RunCheckpoint(parent.parent, int(path.name), parent.name == "best")
    return None


def _tuples(tree: Any) -> Any:
    """config.json turned the config's tuples into lists; give them back."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def _require_run(path: str | os.PathLike) -> RunCheckpoint:
    found = find_run(path)
    if found is None:
        read_run_config(path)  # raises, saying what is missing
        raise WeightsError(f"{path} is not a training run directory or one of its checkpoints")
    return found


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """A run's config (its `config.json`) as a ConfigDict."""
    root = checkpointing.run_path(workdir)
    file = root / "config.json"
    if not _is_run_root(root):
        what = "no such directory" if not root.is_dir() else "it has no config.json"
        if root.is_dir() and file.is_file():
            what = "it has neither checkpoints/ nor best/"
        raise WeightsError(
            f"{workdir} is not a training run directory ({what}; a run directory holds "
            "config.json and checkpoints/, as `python -m pgpc_jax.main --workdir` writes them)"
        )
    try:
        return ml_collections.ConfigDict(_tuples(json.loads(file.read_text())))
    except ValueError as e:
        raise WeightsError(f"{file} is not a readable run config ({e})") from e


def complete_method_group(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A run's config with the fields its method's group gained after the run was written, at
    their defaults (a field is added with the default that keeps the earlier behaviour, e.g.
    `fda.contrast_weight` = 0), so that older runs stay readable."""
    from pgpc_jax import methods  # the trainer's layer, imported where it is needed

    name = config.get("method", "")
    group = getattr(methods.METHODS.get(name), "config_group", None)
    if group is None or name not in config:
        return config
    defaults = group()
    missing = [key for key in defaults if key not in config[name]]
    if missing:
        with config.unlocked():
            for key in missing:
                config[name][key] = defaults[key]
    return config


def load_run(
    workdir: str | os.PathLike, step: int | None = None, best: bool = False
) -> tuple[ml_collections.ConfigDict, Any, int]:
    """Read one checkpoint of a training run onto one device.

    The state's structure comes from the run's own config.json (`train.abstract_train_state`),
    and every leaf is restored to this process's first device, so a checkpoint written by a
    multi-device or multi-process run restores in a single process.

    Args:
      workdir: the run directory (holds config.json and checkpoints/).
      step: a step of `checkpoints/` (of `best/` with `best`); None for the latest (the best).
      best: read the best checkpoint, `best/`.

    Returns:
      (config, state, step): the run's ConfigDict, its TrainState (arrays on one device) and the
      step read. Raises WeightsError / CheckpointError (naming the steps there are).
    """
    # Imported here: `train` loads `init_from` weights through this module.
    from pgpc_jax import train

    config = read_run_config(workdir)
    root = checkpointing.run_path(workdir)
    if "method" not in config and "contrast" in config:
        raise WeightsError(
            f"{root / 'config.json'} is a run of pgpc_jax before methods were modules (it has "
            "uda.method and contrast, not method): read it with that version (git 22e616e), "
            "e.g. export it to --format flax there, and load the export here"
        )
    config = complete_method_group(config)
    try:
        _, _, abstract = train.abstract_train_state(config)
    except Exception as e:  # a config.json from another version of the code: say which file
        raise WeightsError(
            f"{root / 'config.json'} does not describe a run this code can rebuild "
            f"({type(e).__name__}: {e})"
        ) from e
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
    )
    ckpts = checkpointing.RunCheckpoints(root)
    try:
        state, step = ckpts.read(abstract, step=step, best=best)
    finally:
        ckpts.close()
    return config, state, step


def run_variables(state: Any, which: str = "model") -> dict:
    """The variables {'params', 'batch_stats'} of a run's student ('model') or EMA teacher
    ('ema_model'); the teacher carries the student's BatchNorm running statistics."""
    _check_run_which(which)
    params = state.params if which == "model" else state.teacher_params
    if params is None:
        raise WeightsError(
            "--which=ema_model: this run's method has no EMA teacher; use --which=model"
        )
    return {"params": params, "batch_stats": state.batch_stats}


def _check_run_which(which: str) -> None:
    if which not in ("model", "ema_model"):
        raise WeightsError(
            f"--which={which!r}: a training run holds the student ('model') and the EMA teacher "
            "('ema_model')"
        )


# ------------------------------------------------------------------------------------------------
# Any source.


def check_same_model(stored: Mapping, model_cfg: Mapping, source: str) -> None:
    """Raise WeightsError naming every `model.*` field where `stored` differs from the config."""
    diff = {k: (stored.get(k), model_cfg.get(k)) for k in MODEL_KEYS}
    diff = {k: (a, b) for k, (a, b) in diff.items() if a != b}
    if diff:
        raise WeightsError(
            f"{source} holds a different model than the config: "
            + ", ".join(f"model.{k}: weights {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        )


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def load_model(
    model_cfg: Mapping,
    weights: str,
    fmt: str = "flax",
    which: str = "model",
    auxiliary_heads: Mapping[str, Any] | None = None,
    missing_auxiliary: str = "error",
):
    """Build the config's model and load `weights` in format `fmt` into it.

    Args:
      model_cfg: the config's `model` group.
      weights: a weights directory, a run directory (or one of its checkpoints), or a PyTorch /
        HF checkpoint.
      fmt: one of WEIGHT_FORMATS; 'flax' reads a run too when `weights` is one.
      which: 'model' (student), 'ema_model' (teacher) or 'imnet_model' (DAFormer only).
      auxiliary_heads: the model's auxiliary heads ({name: unbound module}, as
        `segmentor.build_segmentor` takes them); none by default (the segmentor alone).
      missing_auxiliary: for an auxiliary head the weights lack, 'error' (one line naming it) or
        'init' (it keeps its initialisation, with a note).

    Returns:
      (model, variables): the Segmentor of `model_cfg` and its {'params', 'batch_stats'}.
    """
    model_cfg = dict(model_cfg)
    if fmt not in WEIGHT_FORMATS:
        raise WeightsError(f"--weights-format={fmt!r}: expected one of {WEIGHT_FORMATS}")
    if which not in WHICH:
        raise WeightsError(f"--which={which!r}: expected one of {WHICH}")
    if missing_auxiliary not in MISSING_AUXILIARY:
        raise WeightsError(
            f"missing_auxiliary={missing_auxiliary!r}: expected one of {MISSING_AUXILIARY}"
        )
    model = segmentor.build_segmentor(model_cfg, auxiliary_heads)
    if fmt == "flax" and not checkpointing.is_weights_dir(weights):
        if find_run(weights) is None:
            raise WeightsError(
                f"{weights} is not a pgpc_jax weights directory (model.json and variables/, from "
                "`convert to-flax` or `export --format flax`) nor a training run directory "
                "(config.json and checkpoints/, from `python -m pgpc_jax.main`)"
            )
        fmt = "run"
    if fmt == "run":
        found = _require_run(weights)
        _check_run_which(which)
        # The run's own config says which model it trained: compared before anything is read.
        run_model = read_run_config(found.root).model.to_dict()
        check_same_model(run_model, model_cfg, f"{weights} (its config.json)")
        _, state, step = load_run(found.root, found.step, found.best)
        folder = "best" if found.best else "checkpoints"
        who = "student" if which == "model" else "EMA teacher"
        _note(f"{weights}: the {who} of {found.root / folder / str(step)}")
        if which == "ema_model":
            _note(TEACHER_NOTE)
        variables = run_variables(state, which)
        return model, convert.fit_variables(variables, model, weights, missing_auxiliary, _note)
    if fmt == "flax":
        stored = checkpointing.read_model_file(weights)["model"]
        check_same_model(stored, model_cfg, weights)
        variables, _, _ = convert.load_weights_dir(weights)  # with its auxiliary heads, if any
        return model, convert.fit_variables(variables, model, weights, missing_auxiliary, _note)
    variables, left = convert.to_flax(
        weights,
        fmt,
        model_cfg,
        which,
        auxiliary_heads=auxiliary_heads,
        missing_auxiliary=missing_auxiliary,
        note=_note,
    )
    if left:
        print(
            f"warning: {weights} has no decode head; predictions come from an untrained head",
            file=sys.stderr,
        )
    return model, variables


def define_flags(multiple: bool = False) -> None:
    """--weights, --weights-format and --which, as `predict` and `evaluate` take them.

    Args:
      multiple: --weights takes several paths (an ensemble: `evaluate`, `pseudo_label`), as
        repeated flags, a comma list or paths after one --weights (`gather_weights_arguments`
        turns the last form into the first); read them with `weights_paths(FLAGS.weights)`.
        False (`predict`): one path, a plain string flag.
    """
    from absl import flags

    help_text = (
        "Weights: a Flax weights directory, a training run directory (RUN, RUN/best, "
        "RUN/checkpoints/<step>) or a PyTorch / HF checkpoint."
    )
    if multiple:
        flags.DEFINE_multi_string(
            "weights",
            None,
            help_text + " Several (an ensemble: the mean of the models' softmax): "
            "--weights W1 W2, --weights W1,W2 or --weights W1 --weights W2.",
        )
    else:
        flags.DEFINE_string("weights", None, help_text)
    flags.DEFINE_enum(
        "weights-format",
        "flax",
        list(WEIGHT_FORMATS),
        "Format of --weights (every one of them); a run directory is recognised when left at flax.",
    )
    flags.DEFINE_enum(
        "which",
        "model",
        list(WHICH),
        "Network: the student ('model'), the EMA teacher ('ema_model': runs, DAFormer and SePiCo "
        "checkpoints) or DAFormer's ImageNet copy ('imnet_model').",
    )


def gather_weights_arguments(argv: Sequence[str]) -> list[str]:
    """`argv` with the paths that follow one --weights turned into repeated --weights flags.

    absl reads `--weights W1 W2 W3` as --weights=W1 and two positional arguments; every argument
    after a --weights value up to the next one that starts with '-' (or `--`, the end of the
    flags) is read as one more --weights here. Only for commands without positional arguments.
    """
    argv = list(argv)
    out, i = argv[:1], 1
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg == "--":
            out += argv[i:]
            break
        if arg in ("--weights", "-weights") and i < len(argv):
            out.append(argv[i])
            i += 1
        elif not arg.startswith(("--weights=", "-weights=")):
            continue
        while i < len(argv) and not argv[i].startswith("-"):
            out.append(f"--weights={argv[i]}")
            i += 1
    return out


def weights_paths(values: str | Sequence[str] | None) -> list[str]:
    """The paths of a --weights flag: each value split at commas, empty parts dropped.

    A path that holds a comma cannot be given (it is always a separator).
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [part for value in values for part in value.split(",") if part.strip()]


def load_models(
    model_cfg: Mapping, paths: Sequence[str], fmt: str = "flax", which: str = "model"
) -> tuple[segmentor.Segmentor, list[dict]]:
    """`load_model` for several weights of the same config's model (an ensemble).

    Args:
      model_cfg: the config's `model` group; every source must describe this model.
      paths: the weights, each in format `fmt`, network `which`.

    Returns:
      (model, [variables of each path, in order]); the first error names its path.
    """
    if not paths:
        raise WeightsError("--weights: no path given")
    model, variables = None, []
    for path in paths:
        model, loaded = load_model(model_cfg, path, fmt, which)
        variables.append(loaded)
    return model, variables
