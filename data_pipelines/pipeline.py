"""grain input pipelines: source crops with rare-class sampling, target crops, validation images.

Every pipeline takes any `Sequence[dict]` (a `sources.SegmentationSource`, or a list in tests and
small runs) whose elements hold `image` uint8 [H, W, 3] and `label` uint8 [H, W] (or [H, W, 1]),
and returns a batched `grain.MapDataset` of static-shape numpy dicts
    image  float32 [B, h, w, 3] normalised as DAFormer (or uint8 with normalize=False, so the
           normalisation can run on device: `(x - labels.IMAGENET_MEAN) / labels.IMAGENET_STD`)
    label  int32 [B, h, w] train ids, 255 = ignore
plus, for each of the training pipelines' `paired_keys` (e.g. `day_image`, the day image paired
with a Dark Zurich night image), that image put through the same resize, crop box, flip and
normalisation as `image` (float32 or uint8 [B, h, w, 3]).
B is the per-process batch; the global batch is G = B * P over P processes. The training
pipelines define one global stream of examples whose element i depends only on (seed, i); global
batch n is stream elements n*G .. n*G + G - 1, and process p reads its block of B of them (rows
p*B .. p*B + B - 1). So the processes read disjoint positions of the stream, and the global batch
that `jax.make_array_from_process_local_data` assembles is the batch one process would read: a
run gives the same batches on 1 process x 8 devices as on 2 processes x 4. The pipelines are
deterministic, and `make_iterator(...).get_state()` / `.set_state()` resume exactly.

DAFormer's recipe (`configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py`):
  source  Resize((1280, 720)) keep-ratio, RandomCrop(512, cat_max_ratio=0.75), RandomFlip(0.5),
          with RCS (T=0.01, min_pixels=3000, min_crop_ratio=0.5) choosing the image
  target  Resize((1024, 512)), RandomCrop(512), RandomFlip(0.5)
  val     Resize((1024, 512)) of the image only; labels at full resolution
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from data_pipelines import transforms
from data_pipelines.labels import IGNORE_INDEX
from data_pipelines.rcs import RareClassSampler, RcsConfig

# DAFormer's RCS settings: T = 0.01, min_pixels = 3000, min_crop_ratio = 0.5.
DAFORMER_RCS = RcsConfig()
# A MapDataset this long never runs out: RCS ignores the index except as a random stream.
_ENDLESS = 2**40


def _squeeze_label(label: np.ndarray) -> np.ndarray:
    return label[..., 0] if label.ndim == 3 else label


def _finish(image: np.ndarray, label: np.ndarray, normalize: bool) -> dict:
    image = transforms.normalize(image) if normalize else np.ascontiguousarray(image)
    return {"image": image, "label": label.astype(np.int32)}


class _CropSample:
    """Resize, crop (with cat_max_ratio and the RCS crop rule), flip, normalise one example."""

    def __init__(
        self, scale, crop_size, cat_max_ratio, flip_prob, normalize, rcs_config=None, paired_keys=()
    ):
        self.scale, self.crop_size = scale, tuple(crop_size)
        self.cat_max_ratio, self.flip_prob = cat_max_ratio, flip_prob
        self.normalize, self.rcs_config = normalize, rcs_config
        self.paired_keys = tuple(paired_keys)

    def paired(self, example: dict, key: str, shape, box, flip: bool) -> np.ndarray:
        """`example[key]` resized, cropped at `box`, flipped and normalised as the image was."""
        if key not in example:
            raise ValueError(
                f"example {example.get('name', '')!r} has no {key!r} (keys: {sorted(example)}); "
                "give the pipeline a source whose examples carry it, e.g. "
                "dark_zurich.open_day_night_pairs for day_image"
            )
        other, _ = transforms.rescale(example[key], None, self.scale)
        if other.shape[:2] != tuple(shape):
            raise ValueError(
                f"example {example.get('name', '')!r}: {key} is {other.shape[1]}x{other.shape[0]} "
                f"after resizing but its image is {shape[1]}x{shape[0]}; both must match"
            )
        other, _ = transforms.crop_and_pad(other, np.zeros(shape, np.uint8), box, self.crop_size)
        if flip:
            other = other[:, ::-1]
        return transforms.normalize(other) if self.normalize else np.ascontiguousarray(other)

    def crop(self, example: dict, rng: np.random.Generator, rare_class: int | None = None) -> dict:
        image = example["image"]
        label = example.get("label")
        label = (
            np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
            if label is None
            else _squeeze_label(label)
        )
        image, label = transforms.rescale(image, label, self.scale)
        shape = image.shape[:2]
        box = transforms.random_crop_box(rng, label, shape, self.crop_size, self.cat_max_ratio)
        if rare_class is not None and self.rcs_config.min_crop_ratio > 0:
            need = self.rcs_config.min_pixels * self.rcs_config.min_crop_ratio
            for _ in range(10):
                y0, x0 = box
                window = label[y0 : y0 + self.crop_size[0], x0 : x0 + self.crop_size[1]]
                if np.count_nonzero(window == rare_class) > need:
                    break
                box = transforms.random_crop_box(
                    rng, label, shape, self.crop_size, self.cat_max_ratio
                )
        image, label = transforms.crop_and_pad(image, label, box, self.crop_size)
        flip = rng.random() < self.flip_prob  # mmseg RandomFlip: flip if U(0, 1) < prob.
        if flip:
            image, label = transforms.hflip(image, label)
        out = _finish(image, label, self.normalize)
        for key in self.paired_keys:
            out[key] = self.paired(example, key, shape, box, flip)
        return out

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        return self.crop(example, rng)


class _RareClassSample:
    """Maps a stream index to an RCS-chosen, cropped source example."""

    def __init__(self, source: Sequence[dict], sampler: RareClassSampler, cropper: _CropSample):
        self.source, self.sampler, self.cropper = source, sampler, cropper

    def __call__(self, index: int, rng: np.random.Generator) -> dict:
        del index  # As DAFormer: with RCS on, __getitem__ ignores idx.
        rare_class, image_index = self.sampler.sample(rng)
        return self.cropper.crop(self.source[image_index], rng, rare_class)


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")


class _ProcessBlock:
    """Element j of process p's share -> element of the global stream (see the module
    docstring): batch n = j // B of this process is rows p*B .. p*B + B - 1 of global batch n."""

    def __init__(self, stream: grain.MapDataset, batch_size, process_index, process_count):
        self.stream, self.batch_size = stream, batch_size
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, j: int) -> dict:
        n, row = divmod(j, self.batch_size)
        first = (n * self.process_count + self.process_index) * self.batch_size
        return self.stream[first + row]


def _process_batches(
    stream: grain.MapDataset, batch_size: int, process_index: int, process_count: int
) -> grain.MapDataset:
    """This process's batches of B rows from the global stream."""
    if process_count > 1:
        block = _ProcessBlock(stream, batch_size, process_index, process_count)
        stream = grain.MapDataset.range(len(stream) // process_count).map(block)
    return stream.batch(batch_size, drop_remainder=True)


def source_dataset(
    source: Sequence[dict],
    *,
    batch_size: int,
    crop_size: tuple[int, int] = (512, 512),
    scale: tuple[int, int] | None = (1280, 720),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    rcs: RcsConfig | None = DAFORMER_RCS,
    class_pixels: np.ndarray | None = None,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    normalize: bool = True,
    paired_keys: Sequence[str] = (),
) -> grain.MapDataset:
    """The endless source-domain pipeline.

    Args:
      source: Sequence of dicts with image uint8 [H, W, 3], label uint8 [H, W] (and class_pixels).
      batch_size: per-process batch size B.
      crop_size: (h, w) of the crops.
      scale: keep-ratio resize bound (w, h) applied before cropping, None for none (a no-op when
        the build already stored this scale).
      cat_max_ratio: mmseg RandomCrop's largest-class share (1.0 disables the re-draws).
      flip_prob: horizontal flip probability.
      rcs: rare-class sampling settings, None for uniform shuffling.
      class_pixels: int [N, C] per-image class counts; default `source.class_pixels`, else
        gathered from `source[i]['class_pixels']`.
      seed: pipeline seed.
      process_index: this process's index p.
      process_count: number of processes P.
      normalize: float32 normalised images, or uint8 when False.
      paired_keys: further image keys of each example (same size as `image`) that get exactly
        the image's resize, crop box, flip and normalisation, e.g. ('day_image',).

    Returns:
      Batched MapDataset: image [B, h, w, 3], label int32 [B, h, w], and each paired key
      [B, h, w, 3].
    """
    _check_process(process_index, process_count)
    cropper = _CropSample(scale, crop_size, cat_max_ratio, flip_prob, normalize, rcs, paired_keys)
    if rcs is None:
        stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        stream = stream.random_map(cropper, seed=seed)
    else:
        if class_pixels is None:
            class_pixels = getattr(source, "class_pixels", None)
        if class_pixels is None:
            class_pixels = np.stack([source[i]["class_pixels"] for i in range(len(source))])
        sampler = RareClassSampler(class_pixels, rcs)
        stream = grain.MapDataset.range(_ENDLESS)
        stream = stream.random_map(_RareClassSample(source, sampler, cropper), seed=seed)
    return _process_batches(stream, batch_size, process_index, process_count)


def target_dataset(
    source: Sequence[dict],
    *,
    batch_size: int,
    crop_size: tuple[int, int] = (512, 512),
    scale: tuple[int, int] | None = (1024, 512),
    cat_max_ratio: float = 1.0,
    flip_prob: float = 0.5,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    normalize: bool = True,
    paired_keys: Sequence[str] = (),
) -> grain.MapDataset:
    """The endless target-domain pipeline: uniform shuffled images, resize, crop, flip.

    Args:
      source: Sequence of dicts with image uint8 [H, W, 3] (label optional: all 255 if absent).
      batch_size: per-process batch size B.
      crop_size: (h, w) of the crops.
      scale: keep-ratio resize bound (w, h), None for none.
      cat_max_ratio: 1.0 as DAFormer's target pipeline (< 1 needs labels).
      flip_prob: horizontal flip probability.
      seed: pipeline seed (reshuffled every epoch).
      process_index: this process's index p.
      process_count: number of processes P.
      normalize: float32 normalised images, or uint8 when False.
      paired_keys: further image keys transformed exactly as `image`, e.g. ('day_image',) with
        `dark_zurich.open_day_night_pairs` as the source (SePiCo's night variant).

    Returns:
      Batched MapDataset: image [B, h, w, 3], label int32 [B, h, w], and each paired key
      [B, h, w, 3].
    """
    return source_dataset(
        source,
        batch_size=batch_size,
        crop_size=crop_size,
        scale=scale,
        cat_max_ratio=cat_max_ratio,
        flip_prob=flip_prob,
        rcs=None,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        normalize=normalize,
        paired_keys=paired_keys,
    )


class _ValSample:
    """Index j of process p's shard -> example p + j * P resized, or an all-ignore pad example."""

    def __init__(self, source, scale, normalize, process_index, process_count):
        self.source, self.scale, self.normalize = source, scale, normalize
        self.process_index, self.process_count = process_index, process_count
        first = source[0]
        image, _ = transforms.rescale(first["image"], None, scale)
        self.image_shape = image.shape
        self.label_shape = _squeeze_label(first["label"]).shape

    def __call__(self, j: int) -> dict:
        index = self.process_index + j * self.process_count
        if index >= len(self.source):
            image = np.zeros(self.image_shape, np.uint8)
            label = np.full(self.label_shape, IGNORE_INDEX, np.uint8)
        else:
            example = self.source[index]
            image, _ = transforms.rescale(example["image"], None, self.scale)
            label = _squeeze_label(example["label"])
            if image.shape != self.image_shape or label.shape != self.label_shape:
                raise ValueError(
                    f"validation example {index} has image {image.shape} / label {label.shape}; "
                    f"batches need {self.image_shape} / {self.label_shape}"
                )
        return _finish(image, label, self.normalize)


def val_dataset(
    source: Sequence[dict],
    *,
    batch_size: int,
    scale: tuple[int, int] | None = (1024, 512),
    process_index: int = 0,
    process_count: int = 1,
    normalize: bool = True,
) -> grain.MapDataset:
    """One pass over the validation split: whole images at the test scale, full-size labels.

    Every process gets the same number of batches: its shard is padded with all-ignore examples
    (image 0, label 255), which the confusion matrix does not count.

    Args:
      source: Sequence of dicts with image uint8 [H, W, 3], label uint8 [H, W]; all the same size.
      batch_size: per-process batch size B.
      scale: keep-ratio resize bound (w, h) for the images, None to keep them.
      process_index: this process's index p.
      process_count: number of processes P.
      normalize: float32 normalised images, or uint8 when False.

    Returns:
      Finite batched MapDataset: image [B, h, w, 3], label int32 [B, H, W].
    """
    _check_process(process_index, process_count)
    per_process = -(-len(source) // process_count)
    length = -(-per_process // batch_size) * batch_size
    transform = _ValSample(source, scale, normalize, process_index, process_count)
    return grain.MapDataset.range(length).map(transform).batch(batch_size, drop_remainder=True)


def _mark_absl_flags_parsed() -> None:
    # grain workers read absl flags; outside absl.app.run they are unparsed and would raise.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(
    dataset: grain.MapDataset,
    *,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch_batches: int = 2,
) -> grain.DatasetIterator:
    """Starts iterating a pipeline, optionally in worker processes.

    Workers are spawned: a script that uses them needs `if __name__ == '__main__':`. The order of
    batches does not depend on `num_workers` or `num_threads`.

    Args:
      dataset: a pipeline from this module.
      num_workers: worker processes (0: all in this process).
      num_threads: threads reading elements in each process.
      prefetch_batches: batches read ahead per process (grain's default of 500 would hold
        gigabytes of crops).

    Returns:
      A grain DatasetIterator with `get_state()` / `set_state(state)`.
    """
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    )
    if num_workers > 0:
        _mark_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
        )
    return iter(iter_dataset)
