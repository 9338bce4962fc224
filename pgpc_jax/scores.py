"""Scores of a segmentation: confusion matrix, IoU per class, mIoU, and their tables.

mIoU is mmseg `mean_iou`: intersection and union accumulated over the whole dataset, one IoU per
class (NaN when the class is neither in the labels nor in the predictions), then the nanmean over
classes. cityscapesscripts `evalPixelLevelSemanticLabeling` gives the same numbers (a test checks
it). Metric keys name the classes: `eval/iou/<name>` with the run's class names (`class_set`);
`eval/miou16` / `eval/miou13` (SYNTHIA's subsets, `labels.MIOU16_CLASSES`) exist only for the 19
Cityscapes classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import labels as label_table


def confusion_matrix(
    pred: jax.Array,
    label: jax.Array,
    num_classes: int,
    ignore_index: int = label_table.IGNORE_INDEX,
) -> jax.Array:
    """Counts (label, prediction) pairs over the valid pixels.

    Pixels whose label is `ignore_index` or outside [0, K) do not count (mmseg's `histc` drops
    labels >= K too). Masks are weights, never boolean indexing, so this is jittable and works
    on a batch sharded over a mesh (XLA reduces the per-device counts).

    Args:
      pred: int [B, H, W] predicted class ids in [0, K).
      label: int [B, H, W] ground-truth ids; `ignore_index` marks unlabelled pixels.
      num_classes: K.
      ignore_index: label value that is not evaluated.

    Returns:
      int32 [K, K] matrix, rows = ground truth, columns = prediction.
    """
    k = num_classes
    label = label.astype(jnp.int32).reshape(-1)
    pred = jnp.clip(pred.astype(jnp.int32).reshape(-1), 0, k - 1)
    valid = (label != ignore_index) & (label >= 0) & (label < k)
    index = jnp.where(valid, label * k + pred, 0)
    counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=k * k)
    return counts.astype(jnp.int32).reshape(k, k)


def miou_from_confusion(
    cm: np.ndarray, class_subset: Sequence[int] | None = None
) -> tuple[float, np.ndarray]:
    """Mean IoU from a dataset-accumulated confusion matrix, as mmseg `mean_iou`.

    Args:
      cm: [K, K] counts, rows = ground truth, columns = prediction.
      class_subset: class ids the mean is taken over (e.g. `labels.MIOU16_CLASSES`); all K
        when None.

    Returns:
      (mIoU as a float in [0, 1] (NaN if no class of the subset occurs),
       float64 [K] IoU of every class, NaN where the union is empty).
    """
    cm = np.asarray(cm, np.float64)
    intersection = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    subset = iou if class_subset is None else iou[np.asarray(class_subset, np.int64)]
    miou = float(np.nanmean(subset)) if np.any(~np.isnan(subset)) else float("nan")
    return miou, iou


def metric_name(class_name: str) -> str:
    """'traffic light' -> 'eval/iou/traffic_light'."""
    return "eval/iou/" + class_name.replace(" ", "_")


def metrics_from_confusion(
    cm: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """{'eval/miou', ['eval/miou16', 'eval/miou13' for the 19 Cityscapes classes only],
    'eval/iou/<class>'}: fractions in [0, 1], NaN for classes absent from labels and predictions.

    `class_names` name the K classes (`default_class_names(K)` when None)."""
    k = cm.shape[0]
    names = tuple(class_names or default_class_names(k))
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    miou, iou = miou_from_confusion(cm)
    metrics = {"eval/miou": miou}
    if names == label_table.CLASSES:
        metrics["eval/miou16"] = miou_from_confusion(cm, label_table.MIOU16_CLASSES)[0]
        metrics["eval/miou13"] = miou_from_confusion(cm, label_table.MIOU13_CLASSES)[0]
    for name, value in zip(names, iou, strict=True):
        metrics[metric_name(name)] = float(value)
    return metrics


def iou_table(metrics: Mapping[str, float], class_names: Sequence[str]) -> str:
    """A markdown table (aligned as plain text too) of the per-class IoU and the means, in %."""
    rows = [(name, metrics[metric_name(name)]) for name in class_names]
    for key, title in (("eval/miou", "mIoU"), ("eval/miou16", "mIoU16"), ("eval/miou13", "mIoU13")):
        if key in metrics:
            rows.append((f"**{title}**" if key == "eval/miou" else title, metrics[key]))
    width = max(len("class"), *(len(r[0]) for r in rows))
    lines = [f"| {'class':<{width}} | {'IoU':>6} |", f"|{'-' * (width + 2)}|-------:|"]
    for name, value in rows:
        text = "n/a" if np.isnan(value) else f"{100 * value:.2f}"
        lines.append(f"| {name:<{width}} | {text:>6} |")
    return "\n".join(lines)


def iou_markdown(metrics: Mapping[str, float]) -> str:
    """The per-class IoU (`eval/iou/<name>` keys) and the mIoUs as a markdown table (a class
    absent from the labels and the predictions: n/a)."""
    rows = [
        (k[len("eval/iou/") :].replace("_", " "), v)
        for k, v in metrics.items()
        if k.startswith("eval/iou/")
    ]
    rows += [
        (k[len("eval/") :].replace("miou", "mIoU"), v)
        for k, v in metrics.items()
        if k.startswith("eval/miou")
    ]
    cells = [
        f"| {name} | {'n/a' if not np.isfinite(value) else f'{100 * value:.2f}'} |"
        for name, value in rows
    ]
    return "| class | IoU (%) |\n|---|---:|\n" + "\n".join(cells)


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of K classes known by count only: Cityscapes' for 19, else class_0 .. class_{K-1}."""
    if num_classes == label_table.NUM_CLASSES:
        return label_table.CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))
