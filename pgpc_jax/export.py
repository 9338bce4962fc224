"""Export a training run's network for use elsewhere (CLI: `python -m pgpc_jax.export`).

  # DAFormer's checkpoint layout, read by DAFormer's tools/test.py (it evaluates `model.`)
  python -m pgpc_jax.export --workdir runs/gta2cs --format daformer --out gta2cs.pth
  # The best checkpoint's EMA teacher as a Flax weights directory (predict / evaluate / init_from)
  python -m pgpc_jax.export --workdir runs/gta2cs --best --which teacher --format flax \
      --out weights/gta2cs_teacher
  # The encoder of step 40000 in NVlabs' mit_b*.pth layout; a SegFormer-head run as an HF folder
  python -m pgpc_jax.export --workdir runs/gta2cs --step 40000 --format mit --out mit_gta2cs.pth
  python -m pgpc_jax.export --workdir runs/segformer --format hf --out hf_segformer/

The run's latest checkpoint is read unless --step N (a step of RUN/checkpoints/) or --best
(RUN/best/) says otherwise, onto one device whatever the run was trained on. --which picks the
student (default, what DAFormer reports) or the EMA teacher. Formats:

  flax      a weights directory (`checkpointing.save_variables`; meta: source run, step, which)
  daformer  a DAFormer UDA checkpoint .pth, mmcv's {'state_dict', 'meta'} with meta CLASSES,
            PALETTE and iter = step: `model.*` the chosen network and `ema_model.*` the teacher,
            as DAFormer's own training checkpoints hold both. `convert to-flax --format daformer
            --which model|ema_model` reads either back.
  hf        an HF `SegformerForSemanticSegmentation` folder (SegFormer-head runs only: HF has no
            DAFormer head)
  mit       the encoder alone, NVlabs mit_b*.pth keys
  sepico    a SePiCo checkpoint .pth: as daformer, with the projection head as SePiCo names it
            (`model.auxiliary_head.*`, kept by default); `convert to-flax --format sepico` reads it

A method's auxiliary heads (`auxiliary_head/<name>`, e.g. a projection head) are left out by
default, as the originals evaluate the segmentor alone (a note names them);
`--auxiliary_heads=keep` keeps them in the formats that can hold them: `flax`, and `daformer` as
mmseg names them (`model.auxiliary_head.<name>.*`). `hf` and `mit` cannot, and say so.

The teacher has no BatchNorm running statistics of its own (DAFormer's teacher runs BatchNorm in
train mode), so an exported teacher carries the student's running statistics (a note says so).
Every problem (no such run, no checkpoint of that step, an unwritable --out, ...) is one line
on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from pgpc_jax import checkpointing, class_set, convert, weights
from pgpc_jax.cli import parse_flags
from pgpc_jax.torch_names import AUXILIARY_OPTIONS, ConversionError, variables_to_canonical

FORMATS = ("flax", "daformer", "hf", "mit", "sepico")
MMCV_FORMATS = ("daformer", "sepico")  # mmcv checkpoints with `model.` and `ema_model.`
# CLI name -> DAFormer's name of the network (`weights.WHICH`).
WHICH = {"student": "model", "teacher": "ema_model"}
DIRECTORY_FORMATS = ("flax", "hf")  # --out is a folder; else a file


class ExportError(ValueError):
    """Bad export request: conflicting flags, a format the run's model has no layout in."""


def check_out(path: str, fmt: str) -> None:
    """Fail before any work if `path` cannot be written as format `fmt` (nothing is created)."""
    if "://" in path:  # remote (gs://...): the write itself reports problems
        return
    path = os.path.abspath(os.path.expanduser(path))
    want_dir = fmt in DIRECTORY_FORMATS
    if os.path.exists(path):
        if want_dir and not os.path.isdir(path):
            raise ExportError(f"--out={path} is a file; --format {fmt} writes a directory")
        if not want_dir and os.path.isdir(path):
            raise ExportError(f"--out={path} is a directory; --format {fmt} writes a .pth file")
        if not os.access(path if want_dir else os.path.dirname(path), os.W_OK):
            raise ExportError(f"--out={path} is not writable")
        return
    parent = os.path.dirname(path)  # the nearest existing folder above must take new entries
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ExportError(f"--out={path} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"--out={path} cannot be created: {parent} is not writable")


def _host(tree: Any) -> Any:
    # Writable copies: torch.from_numpy warns on the read-only arrays device_get returns.
    return jax.tree.map(np.array, jax.device_get(tree))


def export_run(
    workdir: str,
    fmt: str,
    out: str,
    step: int | None = None,
    best: bool = False,
    which: str = "student",
    legacy_serialization: bool = False,
    auxiliary_heads: str | None = None,
) -> list[str]:
    """Read one checkpoint of a run and write its network in format `fmt` to `out`.

    Args:
      workdir: the run directory (config.json, checkpoints/, best/).
      fmt: one of FORMATS.
      out: the file (daformer, sepico, mit) or folder (flax, hf) to write.
      step: a step of checkpoints/; None for the latest (with `best`, the best checkpoint).
      best: read best/.
      which: 'student' or 'teacher'.
      legacy_serialization: daformer / sepico / mit: PyTorch's pre-1.6 non-zip format.
      auxiliary_heads: 'drop' (the segmentor alone), 'keep' (flax, daformer, sepico: the
        method's auxiliary heads too) or None (the format's default: keep for sepico, else drop).

    Returns:
      The lines to print: what was written, and notes.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r}: expected one of {FORMATS}")
    if which not in WHICH:
        raise ExportError(f"--which={which!r}: expected one of {tuple(WHICH)}")
    if step is not None and best:
        raise ExportError(
            "--step and --best exclude each other: --best reads the best checkpoint (best/), "
            "--step N the checkpoint of step N in checkpoints/"
        )
    convert.check_auxiliary_option(fmt, auxiliary_heads)
    if auxiliary_heads is None:
        auxiliary_heads = convert.default_auxiliary(fmt)
    check_out(out, fmt)
    found = weights.find_run(workdir)
    if found is not None and found.root != checkpointing.run_path(workdir):
        raise ExportError(
            f"--workdir={workdir} is a checkpoint folder of the run {found.root}: use "
            f"--workdir {found.root} with --best or --step N"
        )
    config = weights.read_run_config(workdir)  # before reading a checkpoint: the cheap checks
    model_cfg = config.model.to_dict()
    if fmt == "hf" and model_cfg["head"] != "segformer":
        raise ExportError(
            f"--format hf: the run's model has a {model_cfg['head']!r} head and HF SegFormer has "
            "only the SegFormer head; use --format daformer (the whole segmentor) or --format mit "
            "(the encoder)"
        )
    config, state, step = weights.load_run(workdir, step=step, best=best)
    if which == "teacher" and state.teacher_params is None:
        raise ExportError(
            f"--which teacher: the run in {workdir} trained method {config.get('method')!r}, "
            "which has no EMA teacher; use --which student"
        )
    student = _host(weights.run_variables(state, "model"))
    # A method without a teacher (source_only) exports the student alone.
    teacher = (
        None if state.teacher_params is None else _host(weights.run_variables(state, "ema_model"))
    )
    variables = teacher if which == "teacher" else student
    notes = convert.auxiliary_note(variables, fmt, auxiliary_heads)
    source = f"{checkpointing.run_path(workdir)}/{'best' if best else 'checkpoints'}/{step}"
    classes, palette = class_set.names_and_colors(config)
    palette = [list(c) for c in palette]
    try:
        if fmt == "flax":
            meta = {"source": source, "format": "run", "step": step, "which": WHICH[which]}
            meta.update(class_set.meta_fields(config))
            if auxiliary_heads == "drop":
                variables = convert.without_auxiliary(variables)
            checkpointing.save_variables(out, variables, model_cfg, meta)
            count, what = len(variables_to_canonical(variables)), "Flax weights directory of the"
        elif fmt in MMCV_FORMATS:
            # DAFormer's (and SePiCo's) training checkpoints hold the student as `model.` and
            # the teacher as `ema_model.`; their tools/test.py evaluates `model.`, so --which
            # teacher puts the teacher there.
            state_dict = convert.from_flax(variables, fmt, auxiliary_heads)
            if teacher is not None:
                teacher_dict = convert.from_flax(teacher, fmt, auxiliary_heads)
                state_dict.update({f"ema_{k}": v for k, v in teacher_dict.items()})
            meta = {"CLASSES": tuple(classes), "PALETTE": palette, "iter": step}
            meta["pgpc_jax"] = {"source": source, "model": which}
            if teacher is not None:
                meta["pgpc_jax"]["ema_model"] = "teacher"
            convert.write_torch(out, state_dict, meta, legacy_serialization)
            name = {"daformer": "DAFormer", "sepico": "SePiCo"}[fmt]
            count, what = len(state_dict), f"{name} checkpoint, model. ="
        elif fmt == "hf":
            hf_state = convert.from_flax(variables, "hf")
            convert.write_hf(out, hf_state, model_cfg, classes)
            count, what = len(hf_state), "HF SegFormer folder of the"
        else:
            mit_state = convert.from_flax(variables, "mit")
            convert.write_torch(out, mit_state, None, legacy_serialization)
            count, what = len(mit_state), "MiT encoder (NVlabs mit_b*.pth keys) of the"
    except OSError as e:  # a full disk, a path that vanished: what check_out cannot foresee
        raise ExportError(f"cannot write --out={out}: {e}") from e
    with_teacher = fmt in MMCV_FORMATS and teacher is not None
    who = f"{which}, ema_model. = teacher" if with_teacher else which
    lines = [f"wrote {out}: {what} {who}, {count} tensors, step {step} ({source})"]
    if which == "teacher" or with_teacher:
        lines.append(f"note: {weights.TEACHER_NOTE}")
    return lines + notes


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing stays side-effect free."""
    flags.DEFINE_string("workdir", None, "The run directory (config.json, checkpoints/, best/).")
    flags.DEFINE_integer("step", None, "Export the checkpoint of this step (default: the latest).")
    flags.DEFINE_bool("best", False, "Export the best checkpoint (RUN/best/).")
    flags.DEFINE_enum(
        "which", "student", list(WHICH), "The student (what DAFormer reports) or the EMA teacher."
    )
    flags.DEFINE_enum("format", None, list(FORMATS), "Output format.")
    flags.DEFINE_string(
        "out", None, "Output: a .pth file (daformer, sepico, mit) or a folder (flax, hf)."
    )
    flags.DEFINE_bool(
        "legacy_serialization",
        False,
        "daformer / sepico / mit: the pre-1.6 non-zip format for old PyTorch readers (torch 1.7).",
    )
    flags.DEFINE_enum(
        "auxiliary_heads",
        None,
        list(AUXILIARY_OPTIONS),
        "A method's auxiliary heads: drop exports the segmentor alone (as the originals evaluate "
        "it; the default, except sepico), keep exports them too (flax; daformer as "
        "auxiliary_head.<name>.*; sepico as auxiliary_head.*, its default; not hf or mit).",
    )


def main(argv: list[str]) -> None:
    if not FLAGS["verbosity"].present:  # orbax logs every step of a checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        if len(argv) > 1:
            raise ExportError(f"unexpected arguments: {argv[1:]}")
        missing = [f"--{n}" for n in ("workdir", "format", "out") if not FLAGS[n].value]
        if missing:
            raise ExportError(
                f"{', '.join(missing)} required (usage: python -m pgpc_jax.export "
                "--workdir RUN --format flax|daformer|sepico|hf|mit --out PATH)"
            )
        lines = export_run(
            FLAGS.workdir,
            FLAGS.format,
            FLAGS.out,
            step=FLAGS.step,
            best=FLAGS.best,
            which=FLAGS.which,
            legacy_serialization=FLAGS.legacy_serialization,
            auxiliary_heads=FLAGS.auxiliary_heads,
        )
    except (ExportError, ConversionError, checkpointing.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


def cli() -> None:
    """The `pgpc-export` command (`python -m pgpc_jax.export`)."""
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
