"""Evaluation: on-device confusion matrix, mIoU, whole-image and sliding-window inference.

The protocol is DAFormer's (mmseg v0.16 as vendored in lhoyer/DAFormer):
  * `whole_inference` is `EncoderDecoder.whole_inference` with `rescale=True`: the stride-4
    logits are upsampled bilinearly (align_corners=False) to the network input size inside
    `encode_decode`, then again to the label (original image) size.
  * `slide_inference` is `EncoderDecoder.slide_inference`: a grid of crops whose last row and
    column are moved back to touch the border, the window logits summed and divided by the
    number of windows covering each pixel, then (rescale) resized to the label size.
  * The prediction is the argmax over classes (mmseg takes a softmax first; argmax is the same).
  * Several models (an ensemble, `evaluate` given a list of variable trees): the argmax of the
    mean of their softmax outputs, taken at the input size and resized to the label size
    (`ensemble_probabilities`), as FDA's multi-band evaluation (`evaluation_multi.py`) averages
    its three models. One model keeps the path above.
  * mIoU is mmseg `mean_iou` (`scores.py`), over the run's class names (`class_set.py`).

SYNTHIA→Cityscapes: DAFormer's logs show the 19-class mIoU and its README reports
mIoU16 = mIoU19 · 19/16, which holds only because a SYNTHIA-trained model never predicts terrain,
truck or train, so their IoU is 0 (Cityscapes val does contain them). Here mIoU16 and mIoU13 are
computed directly as the nanmean of the IoUs of their classes (`labels.MIOU16_CLASSES`,
`labels.MIOU13_CLASSES`) from the same 19-class confusion matrix, which equals the README value
in that case and stays correct when it does not hold.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding
from PIL import Image

from data_pipelines import labels as label_table
from pgpc_jax import sharding
from pgpc_jax.models import segmentor
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.scores import (
    confusion_matrix,
    default_class_names,
    iou_table,
    metrics_from_confusion,
)
from pgpc_jax.uda import day_night

MODES = ("whole", "slide")
# Largest pixel count an int32 confusion matrix can take before a cell might overflow.
_INT32_MAX = np.iinfo(np.int32).max


def whole_inference(
    model: segmentor.Segmentor,
    variables: Mapping,
    images: jax.Array,
    label_size: Sequence[int] | None = None,
) -> jax.Array:
    """DAFormer's test-time forward: one pass on the whole image, logits at the label size.

    Args:
      model: the segmentor.
      variables: its variables (params, batch_stats); evaluation mode (running BN statistics).
      images: float32 [B, H, W, 3] normalised images at the test scale.
      label_size: (h, w) of the labels; the input size when None.

    Returns:
      float32 [B, h, w, K] logits. Two bilinear steps as mmseg: stride 4 -> (H, W) in
      `encode_decode`, then (H, W) -> (h, w) for `rescale=True`.
    """
    logits = segmentor.predict_logits(model, variables, images)  # [B, H, W, K]
    if label_size is not None:
        logits = resize_bilinear(logits, tuple(label_size))
    return logits


def slide_windows(
    image_size: Sequence[int], crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """The windows of mmseg's `slide_inference`, in its order.

    Args:
      image_size: (H, W).
      crop: (h_crop, w_crop); a crop larger than the image is cut to the image (no padding).
      stride: (h_stride, w_stride).

    Returns:
      list of (y1, y2, x1, x2) with y2 - y1 = min(h_crop, H) and x2 - x1 = min(w_crop, W).
    """
    (h_img, w_img), (h_crop, w_crop), (h_stride, w_stride) = image_size, crop, stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, h_img)
            x2 = min(w_idx * w_stride + w_crop, w_img)
            # The last window is moved back so that it ends at the border.
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def window_counts(
    image_size: Sequence[int], crop: Sequence[int], stride: Sequence[int]
) -> np.ndarray:
    """float32 [H, W]: how many windows of `slide_windows` cover each pixel (mmseg `count_mat`)."""
    count = np.zeros(tuple(image_size), np.float32)
    for y1, y2, x1, x2 in slide_windows(image_size, crop, stride):
        count[y1:y2, x1:x2] += 1
    return count


def sliding_window_logits(
    logits_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    crop: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
    windows_per_call: int = 1,
) -> jax.Array:
    """Sliding-window logits for any window function (the loop of mmseg `slide_inference`).

    Window positions are static for a given image size, so this traces once per size; the
    window function runs under `lax.map`, so the model is compiled once whatever the count.

    Args:
      logits_fn: crops [B, h, w, 3] -> logits [B, h, w, K] at the crop size.
      images: [B, H, W, 3].
      crop: (h_crop, w_crop).
      stride: (h_stride, w_stride).
      num_classes: K.
      windows_per_call: windows evaluated together (vmapped); more is faster, uses more memory.

    Returns:
      float32 [B, H, W, K]: per pixel, the mean of the logits of the windows covering it.
    """
    b, h_img, w_img = images.shape[:3]
    windows = slide_windows((h_img, w_img), crop, stride)
    crops = jnp.stack([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])  # [N, B, h, w, 3]
    window_logits = jax.lax.map(logits_fn, crops, batch_size=windows_per_call)  # [N, B, h, w, K]
    preds = jnp.zeros((b, h_img, w_img, num_classes), jnp.float32)
    for i, (y1, y2, x1, x2) in enumerate(windows):
        preds = preds.at[:, y1:y2, x1:x2].add(window_logits[i].astype(jnp.float32))
    count = window_counts((h_img, w_img), crop, stride)
    assert count.min() > 0, "sliding windows leave pixels uncovered"
    return preds / jnp.asarray(count)[None, :, :, None]


def slide_inference(
    model: segmentor.Segmentor,
    variables: Mapping,
    images: jax.Array,
    crop: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
    label_size: Sequence[int] | None = None,
    windows_per_call: int = 1,
) -> jax.Array:
    """mmseg `slide_inference` (with `rescale=True` when `label_size` is given).

    Args:
      model, variables: the segmentor and its variables.
      images: float32 [B, H, W, 3] normalised.
      crop: (h_crop, w_crop) window size.
      stride: (h_stride, w_stride).
      num_classes: K.
      label_size: (h, w) to resize the averaged logits to; None keeps (H, W).
      windows_per_call: see `sliding_window_logits`.

    Returns:
      float32 [B, h, w, K] logits. Each window's logits are at the crop size (`encode_decode`
      upsamples its stride-4 output), averaged over overlaps, then resized once to the labels.
    """
    logits = sliding_window_logits(
        lambda x: segmentor.predict_logits(model, variables, x),
        images,
        crop,
        stride,
        num_classes,
        windows_per_call,
    )
    if label_size is not None:
        logits = resize_bilinear(logits, tuple(label_size))
    return logits


def ensemble_probabilities(
    model: segmentor.Segmentor,
    variables_list: Sequence[Mapping],
    images: jax.Array,
    mode: str = "whole",
    crop: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    num_classes: int | None = None,
    label_size: Sequence[int] | None = None,
    class_weights: Sequence[float] | None = None,
    windows_per_call: int = 1,
) -> jax.Array:
    """The mean of several models' softmax outputs (an ensemble, weights 1/N), at the label size.

    As FDA's multi-band prediction (`getSudoLabel_multi.py`, `evaluation_multi.py`): each
    model's softmax is taken at the network's output, the mean over the models is formed there,
    and the mean probabilities are resized to the label size. Here the network's output is the
    logits at the input size (`whole_inference` / `slide_inference` without `label_size`, as
    mmseg's `encode_decode` upsamples them) and the resize is the project's bilinear one
    (align_corners=False); FDA resizes with align_corners=True and weights (0.3333, 0.3333,
    0.3334) for its three models.

    Args:
      model: the segmentor (one architecture for every model).
      variables_list: N variable trees {'params', 'batch_stats'}.
      images: float32 [B, H, W, 3] normalised.
      mode: 'whole' or 'slide' (windows of `crop` every `stride`).
      crop, stride: (h, w) of the sliding windows.
      num_classes: K (needed by 'slide').
      label_size: (h, w) of the output; None keeps (H, W).
      class_weights: K weights of the test-time reweighting (`class_weights_of`), multiplied
        into the mean before the resize (as `reweight_scores` does for one model); None: none.
      windows_per_call: see `sliding_window_logits`.

    Returns:
      float32 [B, h, w, K]: the mean probabilities (times `class_weights` when given).
    """
    if not variables_list:
        raise ValueError("ensemble_probabilities: no models")
    total = None
    for variables in variables_list:
        if mode == "whole":
            logits = whole_inference(model, variables, images)
        else:
            logits = slide_inference(
                model, variables, images, crop, stride, num_classes, None, windows_per_call
            )
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        total = probs if total is None else total + probs
    mean = total / len(variables_list)
    if class_weights is not None:
        mean = mean * jnp.asarray(class_weights, jnp.float32)
    if label_size is not None:
        mean = resize_bilinear(mean, tuple(label_size))
    return mean


@functools.lru_cache(maxsize=16)
def _eval_step(
    model: segmentor.Segmentor,
    mode: str,
    crop: tuple[int, int],
    stride: tuple[int, int],
    num_classes: int,
    ignore_index: int,
    windows_per_call: int,
    class_weights: tuple[float, ...] | None = None,
    ensemble: bool = False,
):
    """jit (cm, variables, images, labels) -> (cm + batch counts, predictions [B, h, w]); with
    `ensemble`, `variables` is a tuple of variable trees (`ensemble_probabilities`)."""

    @jax.jit
    def step(cm, variables, images, labels):
        label_size = labels.shape[1:3]
        if ensemble:
            scores = ensemble_probabilities(
                model,
                variables,
                images,
                mode,
                crop,
                stride,
                num_classes,
                label_size,
                class_weights,
                windows_per_call,
            )
            pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)
            return cm + confusion_matrix(pred, labels, num_classes, ignore_index), pred
        # With class weights, the scores are reweighted at the input size, then resized.
        out_size = label_size if class_weights is None else None
        if mode == "whole":
            scores = whole_inference(model, variables, images, out_size)
        else:
            scores = slide_inference(
                model, variables, images, crop, stride, num_classes, out_size, windows_per_call
            )
        if class_weights is not None:
            scores = reweight_scores(scores, class_weights)
            scores = resize_bilinear(scores, tuple(label_size))
        pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        return cm + confusion_matrix(pred, labels, num_classes, ignore_index), pred

    return step


def reweight_scores(logits: jax.Array, class_weights: Sequence[float]) -> jax.Array:
    """Test-time class reweighting (SePiCo's day-night variant, `eval.class_reweight`): the
    softmax of the logits times each class's weight. The prediction is the argmax of the result.

    Args:
      logits: float [..., K].
      class_weights: K weights.

    Returns:
      float32 [..., K] reweighted probabilities.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs * jnp.asarray(class_weights, jnp.float32)


def class_weights_of(config) -> tuple[float, ...] | None:
    """The test-time class weights a config asks for: `eval.class_reweight` > 0 is the strength
    of SePiCo's frequency-based weights (`uda/day_night.py: class_weights`, 0.16 as released
    for Dark Zurich); 0 (the default) evaluates the plain argmax."""
    strength = float(config.eval.get("class_reweight", 0.0))
    if strength == 0:
        return None
    return tuple(float(w) for w in np.asarray(day_night.class_weights(strength=strength)))


def _mesh_of(variables: Mapping) -> Any:
    leaf = jax.tree.leaves(variables)[0]
    spec = getattr(leaf, "sharding", None)
    return spec.mesh if isinstance(spec, NamedSharding) else None


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:  # every process needs the whole (global) batch
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _fetch_counts(cm: Any) -> np.ndarray:
    return np.asarray(sharding.to_host(cm), np.int64)


def save_visualizations(
    directory: str | None,
    start: int,
    preds: np.ndarray,
    labels: np.ndarray,
    count: int,
    ignore_index: int = label_table.IGNORE_INDEX,
    write: bool = True,
    collect: list | None = None,
    class_colors: Sequence[Sequence[int]] = label_table.PALETTE,
) -> int:
    """Write `<i>_pred.png` and `<i>_label.png` colour images for up to `count` examples.

    Args:
      directory: output directory (None: no files).
      start: index of the first example written (file names count on from it).
      preds: int [B, H, W] predictions; labels: int [B, H, W] train ids.
      count: most examples to write.
      ignore_index: all-ignore labels (the padding of `pipeline.val_dataset`) are skipped.
      write: False only counts (processes other than 0 count along with it).
      collect: if a list, the colour images are also appended to it, as
        {'pred': uint8 [H, W, 3], 'label': uint8 [H, W, 3]} per example.
      class_colors: RGB colour of each class (ignored pixels black).

    Returns:
      The number of examples written.
    """
    keep = [i for i in range(len(labels)) if not np.all(labels[i] == ignore_index)][:count]
    if write and keep:
        if directory is not None:
            directory = epath.Path(directory)  # a gs:// run directory too
            directory.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(keep, start):
            colours = {
                "pred": label_table.colorize(preds[i], class_colors),
                "label": label_table.colorize(labels[i], class_colors),
            }
            if collect is not None:
                collect.append(colours)
            if directory is None:
                continue
            for what, image in colours.items():
                with (directory / f"{n:04d}_{what}.png").open("wb") as f:
                    Image.fromarray(image).save(f, format="PNG")
    return len(keep)


def is_ensemble(variables: Any) -> bool:
    """Whether `variables` is a list / tuple of variable trees (an ensemble) rather than one."""
    return isinstance(variables, (list, tuple))


def evaluate(
    model: segmentor.Segmentor,
    variables: Mapping | Sequence[Mapping],
    batches: Iterable[Mapping[str, np.ndarray]],
    num_classes: int,
    mode: str = "whole",
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    ignore_index: int = label_table.IGNORE_INDEX,
    num_visualizations: int = 0,
    visualization_dir: str | None = None,
    class_names: Sequence[str] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    windows_per_call: int = 1,
    visualizations: list | None = None,
    progress: Any = None,
    class_weights: Sequence[float] | None = None,
    class_colors: Sequence[Sequence[int]] | None = None,
) -> tuple[dict[str, float], str]:
    """Evaluate a model over a finite iterable of batches.

    The confusion matrix stays on device across batches (fetched once at the end; also before
    an int32 cell could overflow, i.e. every 2^31 label pixels).

    Args:
      model, variables: the segmentor and its (student or teacher) variables; a list / tuple
        of variable trees of that model evaluates their ensemble: the argmax of the mean of
        their softmax outputs (`ensemble_probabilities`; times `class_weights` when given).
      batches: dicts with `image` float32 normalised [B, H, W, 3] and `label` int [B, h, w]
        train ids (the labels may be larger than the images, e.g. 1024×2048 for 512×1024).
        Under a multi-process mesh, each process gives its local part of the batch.
      num_classes: K.
      mode: 'whole' (DAFormer) or 'slide' (windows of `crop_size` every `stride`).
      crop_size, stride: (h, w) of the sliding windows.
      ignore_index: label value not evaluated.
      num_visualizations: colour predictions saved for the first N (non-padding) images.
      visualization_dir: where to save them (None: no files, e.g. only `visualizations`).
      class_names: names for the metric keys and the table (`class_set.names_and_colors`);
        `scores.default_class_names(K)` when None.
      mesh: ('data',) mesh the batches are sharded over; found from the variables' sharding
        when None (none: a single device).
      windows_per_call: sliding windows evaluated together.
      visualizations: if a list, the colour images of the visualized examples are appended
        to it (process 0): {'pred', 'label'} uint8 [H, W, 3] each.
      progress: a `metrics_logging.Progress` counting the evaluated images (None: silent).
      class_weights: K weights of the test-time class reweighting (`class_weights_of`): the
        prediction is the argmax of softmax x weights at the input size, resized to the labels
        (SePiCo's day-night test); None: the argmax of the logits.
      class_colors: RGB colour per class of the visualizations; Cityscapes' when None.

    Returns:
      (metrics, table): metrics as `metrics_from_confusion` (plus 'eval/num_pixels', the
      evaluated pixel count), table as `iou_table`.
    """
    if mode not in MODES:
        raise ValueError(f"eval mode={mode!r}: expected one of {MODES}")
    if num_visualizations and not visualization_dir and visualizations is None:
        raise ValueError("num_visualizations > 0 needs a visualization_dir or visualizations")
    if is_ensemble(variables):
        if not variables:
            raise ValueError("evaluate: an empty list of variables")
        variables = tuple(variables)
    names = tuple(class_names or default_class_names(num_classes))
    mesh = mesh if mesh is not None else _mesh_of(variables)
    step = _eval_step(
        model,
        mode,
        tuple(int(v) for v in crop_size),
        tuple(int(v) for v in stride),
        num_classes,
        ignore_index,
        windows_per_call,
        None if class_weights is None else tuple(float(w) for w in class_weights),
        ensemble=is_ensemble(variables),
    )
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
    total = np.zeros((num_classes, num_classes), np.int64)
    zeros = np.zeros((num_classes, num_classes), np.int32)
    cm = sharding.replicate(zeros, mesh) if mesh is not None else zeros
    pixels_on_device = 0
    num_batches = visualized = 0
    for batch in batches:
        image = np.asarray(batch["image"], np.float32)
        label = np.asarray(batch["label"], np.int32)
        if image.shape[0] != label.shape[0]:
            raise ValueError(f"batch of {image.shape[0]} images but {label.shape[0]} labels")
        global_pixels = label.size * jax.process_count()
        if pixels_on_device + global_pixels > _INT32_MAX:  # flush before a cell can overflow
            total += _fetch_counts(cm)
            cm, pixels_on_device = jnp.zeros_like(cm), 0
        if mesh is not None:
            sharding.check_batch_size(
                image.shape[0] * jax.process_count(), mesh, "data.val.batch_size"
            )
            device_batch = sharding.global_batch({"image": image, "label": label}, mesh)
        else:
            device_batch = {"image": jnp.asarray(image), "label": jnp.asarray(label)}
        cm, pred = step(cm, variables, device_batch["image"], device_batch["label"])
        pixels_on_device += global_pixels
        num_batches += 1
        if visualized < num_visualizations:
            # Every process takes part in the gather; process 0 writes.
            visualized += save_visualizations(
                visualization_dir,
                visualized,
                _host(pred),
                _host(device_batch["label"]),
                num_visualizations - visualized,
                ignore_index,
                write=jax.process_index() == 0,
                collect=visualizations,
                class_colors=label_table.PALETTE if class_colors is None else class_colors,
            )
        if progress is not None:  # the global batch (its padding is not counted past the total)
            progress.update(image.shape[0] * jax.process_count())
    if progress is not None:
        progress.close()
    if num_batches == 0:
        raise ValueError("evaluate: the batch iterable is empty")
    total += _fetch_counts(cm)
    metrics = metrics_from_confusion(total, names)
    metrics["eval/num_pixels"] = float(total.sum())
    return metrics, iou_table(metrics, names)
