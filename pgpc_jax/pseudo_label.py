"""Pseudo-labels of target images from one model or an ensemble (`python -m pgpc_jax.pseudo_label`).

  # FDA's multi-band pseudo-labels: the three FDA models, the released 66 % / 0.9 rule
  python -m pgpc_jax.pseudo_label --config configs/gta2cs.py \\
      --weights runs/fda_b001 runs/fda_b005 runs/fda_b009 \\
      --images cityscapes/leftImg8bit/train --resize 1024,512 --out pseudo/round1
  # The target split of a built dataset (what the trainer reads) instead of a folder
  python -m pgpc_jax.pseudo_label --config configs/synthetic.py \\
      --weights runs/fda_b001 runs/fda_b005 runs/fda_b009 \\
      --dataset synthetic_shift/default --split target_train --data_dir data \\
      --resize 256,128 --out pseudo/embedded
  # Target images styled to the source first (FDA, beta 0.01), on grayscale inputs
  python -m pgpc_jax.pseudo_label --config configs/gta2cs.py --weights runs/fda_b001 \\
      --images cityscapes/leftImg8bit/train --resize 1024,512 \\
      --style-images gta/images --style-beta 0.01 --style-window numpy --grayscale \\
      --quantile 0.66 --cap 0.9 --seed 0 --out pseudo/styled
  # The same with the styles from a built split: --style-dataset gta5/daformer --style-split train
  # The output as a training split (TFDS `folder/<name>`, read as `folder/round1` by a config)
  python -m data_pipelines.build --dataset folder --manual_dir pseudo/round1 --name round1 \\
      --data_dir ~/tfds

Flags: --config CONFIG (its `model`, `classes` and `eval` groups, and `data.data_dir`),
--weights W1 [W2 ...] (also `--weights W1,W2` or repeated --weights; one --weights-format and
--which for all, as `evaluate`), the target images as exactly one of
  --images DIR (searched recursively for .png / .jpg / .jpeg) or
  --dataset NAME --split SPLIT [--data_dir DIR] (a built dataset, e.g. `synthetic_shift/default`
  split `target_train`, read as the trainer reads it, `data_pipelines/sources.py`; --data_dir
  defaults to the config's `data.data_dir`; the split's labels, if it has any, are not read:
  the pseudo-labels come from the models only),
--out DIR (absent or empty), --resize W,H (the network input size; default: each image's own
size, which must then be the same for every image), --mode whole|slide (default
config.eval.mode), the source-style images as at most one of --style-images DIR or
--style-dataset NAME --style-split SPLIT (same --data_dir), --style-beta (0.01), --style-window
numpy|torch (numpy), --grayscale, --quantile (0.66), --cap (0.9), --seed (0), --symlink-images
(--images only), --tmp-dir DIR (default: the system's temp folder).

It writes to --out:
  train/images/<rel path>      the target images, copied (with --symlink-images: symbolic links);
                               from --dataset, `<index>.png`: the split's stored PNG of example
                               <index>, the index zero-padded to 5 digits (more from 100000
                               images on), in the split's order
  train/labels/<rel stem>.png  uint8 train ids, 255 where the pixel is ignored
  classes.json                 the config's class table, as `data_pipelines/folder.py` reads it
  pseudo_label_summary.json    thresholds, predicted and kept pixels and shares per class, the
                               ignored share, the models and every option (from --dataset also
                               `record_names`: the split's example name of each written image)
and prints the per-class table. The images are copied by default so that the output is a
self-contained dataset: the folder builder, an archive or another machine reads it whatever
happens to the original folder; --symlink-images saves the disk space instead. Progress with rate
and ETA goes to stderr. Bad input (a missing or empty folder, images of different sizes without
--resize, a dataset that is not built or a split it lacks (the message lists what is built and
which splits there are), weights that do not load, a non-empty --out, ...) is one `error: ...`
line naming the flag or file, exit status 2, and nothing written: every check is made before
--out is created (image sizes come from the file headers, or the stored PNGs' headers of a
split), and images are decoded in the first pass, which writes only to the temporary folder.

Per target image (at its own size H x W, the label size):
1. The network input (`pgpc_jax/pseudo_label_inputs.py`, whose module docstring gives each step
   and its source): the image resized to --resize; with --style-images or --style-dataset given
   the low-frequency amplitude of a source-style image drawn by --seed (FDA, --style-beta,
   --style-window); with --grayscale its luma in the three channels; normalised as the
   project's inputs.
2. The mean of the models' softmax outputs with weights 1/N (`evaluation.ensemble_probabilities`:
   softmax at the network's output size, mean, then resized to H x W, the order of FDA's
   `getSudoLabel_multi.py`; the release weights its three models 0.3333, 0.3333, 0.3334 and
   resizes with align_corners=True to 512 x 1024 [reconstructed: 1/N, the project's resize, the
   image's own size]). No test-time class reweighting: the confidences stay probabilities.
3. The argmax (first maximum on ties) is the label, the maximum the confidence (float32).

Per class c over ALL images [released, `getSudoLabel_multi.py`, `uda/class_thresholds.py`]:
threshold_c is the value at index round(quantile * n_c) (numpy's half-to-even rounding; clamped
to n_c - 1) of the ascending confidences of the n_c pixels labelled c, 0 for a class no pixel is
labelled with, and min(threshold_c, cap); a pixel becomes 255 where its confidence is strictly
below its class's threshold (float64 comparison as released, `class_thresholds.apply_thresholds`).

Memory and disk: the thresholds are exact (the same values as `class_thresholds.class_thresholds`
over all confidences, which the tests check) without holding every confidence in memory. The
first pass stores each image's labels (uint8) and confidences (float32) in a temporary folder,
5 bytes a pixel at the label size (Cityscapes train at 2048 x 1024: 2975 images, 31 GB; checked
against the free space before anything runs), and sums their per-class confidence histograms
(`class_thresholds.class_histogram`: 10 MB for 19 classes). The second pass reads them back once
for `class_thresholds.exact_thresholds`, which keeps only the confidences of the histogram bin of
each class's order statistic (its module docstring says how many that is). The third pass writes
the labels. The temporary folder is removed at the end, on errors too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from pgpc_jax import checkpointing, evaluation, metrics_logging, predict, weights
from pgpc_jax.cli import parse_flags
from pgpc_jax.pseudo_label_inputs import (
    IGNORE,
    STORED_BYTES_PER_PIXEL,
    Options,
    Plan,
    PseudoLabelError,
    check_inputs,
    label_name,
    network_input,
)
from pgpc_jax.torch_names import ConversionError
from pgpc_jax.uda import class_thresholds, fourier

SUMMARY_FILE = "pseudo_label_summary.json"


# ------------------------------------------------------------------------------------------------
# Predictions.


def make_labeller(
    model,
    mode: str = "whole",
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    num_classes: int | None = None,
) -> Callable:
    """jit (variables list, image float32 [H', W', 3], label_size (H, W)) -> (labels uint8
    [H, W], confidences float32 [H, W]): the argmax and the max of the models' mean softmax."""

    @functools.partial(jax.jit, static_argnames="label_size")
    def label(variables_list, image, label_size):
        probs = evaluation.ensemble_probabilities(
            model,
            variables_list,
            image[None],
            mode,
            tuple(crop_size),
            tuple(stride),
            num_classes,
            label_size,
        )[0]
        return jnp.argmax(probs, axis=-1).astype(jnp.uint8), jnp.max(probs, axis=-1)

    def run(variables_list, image, label_size):
        labels, conf = label(tuple(variables_list), jnp.asarray(image), tuple(label_size))
        return np.asarray(labels), np.asarray(conf, np.float32)

    return run


# ------------------------------------------------------------------------------------------------
# The command.


def load_models(options: Options, config):
    """(model, [variables]) of every --weights; an error names the path that does not load."""
    try:
        return weights.load_models(
            config.model, list(options.weights), options.weights_format, options.which
        )
    except (ConversionError, checkpointing.CheckpointError) as e:
        raise PseudoLabelError(str(e)) from e


def _stored(tmp: str, i: int) -> tuple[str, str]:
    return os.path.join(tmp, f"{i:07d}_labels.npy"), os.path.join(tmp, f"{i:07d}_conf.npy")


def _read_stored(
    tmp: str, n: int, progress: metrics_logging.Progress | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(n):
        labels_path, conf_path = _stored(tmp, i)
        yield np.load(labels_path), np.load(conf_path)
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()


def predict_all(plan: Plan, model, variables_list: Sequence[Mapping], tmp: str) -> np.ndarray:
    """First pass: each image's labels and confidences stored in `tmp`; returns the summed
    `class_thresholds.class_histogram` int64 [C, class_thresholds.NUM_BINS]."""
    o = plan.options
    labeller = make_labeller(model, plan.mode, plan.crop_size, plan.stride, plan.num_classes)
    histogram = np.zeros((plan.num_classes, class_thresholds.NUM_BINS), np.int64)
    progress = metrics_logging.Progress("pseudo-labelling", len(plan.images))
    for i, size in enumerate(plan.sizes):
        image = plan.target.read(i)
        style = plan.style.read(int(plan.style_choice[i])) if plan.style is not None else None
        x = network_input(image, o.resize, style, o.style_beta, o.style_window, o.grayscale)
        labels, conf = labeller(variables_list, x, size)
        labels_path, conf_path = _stored(tmp, i)
        np.save(labels_path, labels)
        np.save(conf_path, conf)
        histogram += class_thresholds.class_histogram(labels, conf, plan.num_classes)
        progress.update()
    progress.close()
    return histogram


def write_outputs(plan: Plan, thresholds: np.ndarray, tmp: str) -> np.ndarray:
    """Third pass: images, label PNGs and classes.json under --out; returns the int64 [256]
    counts of the written label values."""
    o = plan.options
    counts = np.zeros((256,), np.int64)
    progress = metrics_logging.Progress("writing labels", len(plan.images))
    stored = _read_stored(tmp, len(plan.images))
    for i, (rel, (labels, conf)) in enumerate(zip(plan.images, stored, strict=True)):
        image_out = os.path.join(o.out, "train", "images", rel)
        label_out = os.path.join(o.out, "train", "labels", label_name(rel))
        os.makedirs(os.path.dirname(image_out), exist_ok=True)
        os.makedirs(os.path.dirname(label_out), exist_ok=True)
        plan.target.write(i, image_out, o.symlink_images)
        pseudo = class_thresholds.apply_thresholds(labels, conf, thresholds, IGNORE)
        pseudo = np.asarray(pseudo).astype(np.uint8)
        Image.fromarray(pseudo).save(label_out)
        counts += np.bincount(pseudo.ravel(), minlength=256)
        progress.update()
    progress.close()
    table = {"classes": list(plan.class_names), "palette": [list(c) for c in plan.palette]}
    with open(os.path.join(o.out, "classes.json"), "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    return counts


def summarize(
    plan: Plan, thresholds: np.ndarray, histogram: np.ndarray, written: np.ndarray
) -> dict:
    """The summary written to pseudo_label_summary.json.

    Per class (by name): `thresholds`, `predicted_pixels` (labelled c before the thresholds),
    `kept_pixels` (labelled c in the PNGs), `kept_share` (kept / predicted; null for a class
    never predicted) and `class_share` (kept / all pixels); `ignored_share` is the share of 255;
    from --dataset, `record_names` {written image name: the split's example name}.
    """
    o = plan.options
    predicted = histogram.sum(axis=1)
    kept = written[: plan.num_classes]
    total = int(written.sum())
    names = plan.class_names
    return {
        "num_images": len(plan.images),
        "num_pixels": total,
        "ignored_pixels": int(written[IGNORE]),
        "ignored_share": float(written[IGNORE] / total),
        "thresholds": {n: float(t) for n, t in zip(names, thresholds, strict=True)},
        "predicted_pixels": {n: int(p) for n, p in zip(names, predicted, strict=True)},
        "kept_pixels": {n: int(k) for n, k in zip(names, kept, strict=True)},
        "kept_share": {
            n: (float(k / p) if p else None) for n, k, p in zip(names, kept, predicted, strict=True)
        },
        "class_share": {n: float(k / total) for n, k in zip(names, kept, strict=True)},
        "models": list(o.weights),
        "options": {
            **dataclasses.asdict(o),
            "data_dir": plan.data_dir,
            "mode": plan.mode,
            "image_files": "symlinked" if o.symlink_images else "copied",
            "thresholds": "exact",
            "model_weights": "1/N",
        },
        **(
            {"record_names": dict(zip(plan.images, plan.record_names))} if plan.record_names else {}
        ),
    }


def summary_table(summary: Mapping) -> str:
    """A markdown table: per class the threshold and the shares (in %), then the ignored share."""
    rows = []
    total = summary["num_pixels"]
    for name, threshold in summary["thresholds"].items():
        predicted = summary["predicted_pixels"][name]
        kept_share = summary["kept_share"][name]
        rows.append(
            (
                name,
                f"{threshold:.4f}",
                f"{100 * predicted / total:.2f}",
                "n/a" if kept_share is None else f"{100 * kept_share:.2f}",
                f"{100 * summary['class_share'][name]:.2f}",
            )
        )
    rows.append(("**ignored (255)**", "", "", "", f"{100 * summary['ignored_share']:.2f}"))
    head = ("class", "threshold", "predicted %", "kept % of class", "share %")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pseudo_label(plan: Plan, model, variables_list: Sequence[Mapping]) -> dict:
    """The three passes (module docstring) and the summary file; returns the summary."""
    o = plan.options
    needed = STORED_BYTES_PER_PIXEL * sum(h * w for h, w in plan.sizes)
    with tempfile.TemporaryDirectory(prefix="pgpc_pseudo_label_", dir=o.tmp_dir) as tmp:
        print(
            f"{len(plan.images)} images, {len(variables_list)} model(s); labels and confidences "
            f"between the passes: {needed / 1e6:.1f} MB in {tmp}",
            file=sys.stderr,
        )
        histogram = predict_all(plan, model, variables_list, tmp)
        thresholds = class_thresholds.exact_thresholds(
            histogram,
            lambda: _read_stored(
                tmp, len(plan.images), metrics_logging.Progress("thresholds", len(plan.images))
            ),
            quantile=o.quantile,
            cap=o.cap,
        )
        written = write_outputs(plan, thresholds, tmp)
    summary = summarize(plan, thresholds, histogram, written)
    with open(os.path.join(o.out, SUMMARY_FILE), "w") as f:
        f.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing stays side-effect free."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config whose `model`, `classes` and `eval` groups are used.",
        lock_config=True,
    )
    weights.define_flags(multiple=True)
    flags.DEFINE_string(
        "images", None, "Folder of target images (searched recursively); or --dataset / --split."
    )
    flags.DEFINE_string(
        "dataset",
        None,
        "Built dataset whose split holds the target images (e.g. synthetic_shift/default), "
        "instead of --images; its labels are not read.",
    )
    flags.DEFINE_string("split", None, "Split of --dataset (e.g. target_train).")
    flags.DEFINE_string(
        "data_dir",
        None,
        "Where --dataset / --style-dataset are built; default config.data.data_dir.",
    )
    flags.DEFINE_string("out", None, "Output folder (absent or empty).")
    flags.DEFINE_string(
        "resize",
        None,
        "Network input size W,H (DAFormer on Cityscapes: 1024,512); labels keep "
        "each image's own size. Needed when the images' sizes differ.",
    )
    flags.DEFINE_enum(
        "mode", None, list(evaluation.MODES), "Inference mode; default config.eval.mode."
    )
    flags.DEFINE_string(
        "style-images",
        None,
        "Folder of source-style images: each target image takes the "
        "low-frequency amplitude of one of them (FDA) before the models see it.",
    )
    flags.DEFINE_string(
        "style-dataset",
        None,
        "Built dataset whose split holds the source-style images (e.g. synthetic_shift/default), "
        "instead of --style-images.",
    )
    flags.DEFINE_string("style-split", None, "Split of --style-dataset (e.g. source_train).")
    flags.DEFINE_float("style-beta", 0.01, "FDA's beta (window half-size floor(min(H, W)*beta)).")
    flags.DEFINE_enum(
        "style-window", "numpy", list(fourier.WINDOWS), "FDA's window convention (uda/fourier.py)."
    )
    flags.DEFINE_bool("grayscale", False, "Feed the models the luma in all three channels.")
    flags.DEFINE_float(
        "quantile",
        class_thresholds.FRACTION,
        "Per-class threshold: the value at this share of "
        "the class's ascending confidences (FDA: 0.66).",
    )
    flags.DEFINE_float("cap", class_thresholds.CAP, "Upper bound of every threshold (FDA: 0.9).")
    flags.DEFINE_integer("seed", 0, "Seed of the style image drawn for each target image.")
    flags.DEFINE_bool(
        "symlink-images", False, "Link the target images into --out instead of copying them."
    )
    flags.DEFINE_string(
        "tmp-dir",
        None,
        "Where the labels and confidences wait between the passes (5 bytes a "
        "pixel); default: the system's temporary folder.",
    )


def options_from_flags() -> Options:
    """The flags as Options (a bad --resize raises predict.PredictError)."""
    style_given = FLAGS["style-beta"].present or FLAGS["style-window"].present
    if style_given and not (FLAGS["style-images"].value or FLAGS["style-dataset"].value):
        raise PseudoLabelError(
            "--style-beta / --style-window need --style-images or --style-dataset"
        )
    return Options(
        images=FLAGS.images,
        dataset=FLAGS.dataset,
        split=FLAGS.split,
        data_dir=FLAGS.data_dir,
        out=FLAGS.out,
        weights=tuple(weights.weights_paths(FLAGS.weights)),
        weights_format=FLAGS["weights-format"].value,
        which=FLAGS.which,
        resize=predict.parse_size(FLAGS.resize),
        mode=FLAGS.mode,
        style_images=FLAGS["style-images"].value,
        style_dataset=FLAGS["style-dataset"].value,
        style_split=FLAGS["style-split"].value,
        style_beta=FLAGS["style-beta"].value,
        style_window=FLAGS["style-window"].value,
        grayscale=FLAGS.grayscale,
        quantile=FLAGS.quantile,
        cap=FLAGS.cap,
        seed=FLAGS.seed,
        symlink_images=FLAGS["symlink-images"].value,
        tmp_dir=FLAGS["tmp-dir"].value,
    )


def execute(options: Options, config) -> int:
    """The command after its flags: checks, models, the three passes, the printed table.

    Returns:
      The exit status: 0, or 2 after one `error: ...` line on stderr (nothing written).
    """
    try:
        plan = check_inputs(options, config)
        model, variables_list = load_models(options, config)
        summary = pseudo_label(plan, model, variables_list)
    except (PseudoLabelError, predict.PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(summary))
    print(
        f"{summary['num_images']} images, {len(options.weights)} model(s): "
        f"{100 * summary['ignored_share']:.2f} % of the pixels ignored; wrote {options.out}"
    )
    return 0


def main(argv: list[str]) -> None:
    if not FLAGS["verbosity"].present:  # orbax logs every step of a checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or not FLAGS.weights or not FLAGS.out:
        raise app.UsageError(
            "usage: pseudo_label --config CONFIG --weights W1 [W2 ...] (--images DIR | --dataset "
            "NAME --split SPLIT [--data_dir DIR]) --out DIR"
        )
    try:
        options = options_from_flags()
    except (PseudoLabelError, predict.PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    status = execute(options, FLAGS.config)
    if status:
        sys.exit(status)


def cli() -> None:
    """The `pgpc-pseudo-label` command (`python -m pgpc_jax.pseudo_label`)."""
    define_flags()
    app.run(main, flags_parser=lambda argv: parse_flags(weights.gather_weights_arguments(argv)))


if __name__ == "__main__":
    cli()
