"""Random-access readers of built datasets: the only place that reads TFDS.

`open_split` returns a `SegmentationSource`, a picklable `Sequence[dict]` over one split's
ArrayRecord files (via `tfds.builder_from_directory(...).as_data_source`, so the builder code is not
needed to read). PNGs are decoded here with PIL rather than by TFDS, so a pipeline that does not
need labels (the target domain) skips decoding them. Each element is
  image        uint8 [H, W, 3]
  label        uint8 [H', W'] train ids (only when `with_label`)
  class_pixels int64 [num_classes]
  name         str
and `source.class_pixels` is the whole split's int64 [N, num_classes] table, read from
`metadata.json` without touching the records (rare-class sampling needs it up front).
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

_SKIP = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}


def dataset_dir(data_dir: str, dataset: str) -> str:
    """Resolves `data_dir` + 'name/config[/version]' to the built dataset's directory.

    Args:
      data_dir: the `--data_dir` of the build.
      dataset: e.g. 'gta5/daformer', 'synthetic_shift/default', 'cityscapes/full/1.0.0'.

    Returns:
      The directory holding dataset_info.json (the newest version if none is given).
    """
    path = os.path.join(data_dir, dataset)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    versions = sorted(
        glob.glob(os.path.join(path, "*", "dataset_info.json")),
        key=lambda p: tuple(int(x) for x in os.path.basename(os.path.dirname(p)).split(".")),
    )
    if not versions:
        raise FileNotFoundError(
            f"no built dataset at {path}; build it with `python -m data_pipelines.build`"
        )
    return os.path.dirname(versions[-1])


def read_metadata(builder_dir: str) -> dict:
    """The builder's metadata.json (class pixel table, build summary, class names)."""
    with open(os.path.join(builder_dir, "metadata.json")) as f:
        return json.load(f)


def _decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)


class SegmentationSource(Sequence):
    """One split of a built dataset as a `Sequence[dict]` (see the module docstring).

    Args:
      builder_dir: directory of the built dataset (see `dataset_dir`).
      split: split name, e.g. 'train', 'val', 'target_train'.
      with_label: decode labels; False returns no 'label' key (faster for unlabelled use).
    """

    def __init__(self, builder_dir: str, split: str, with_label: bool = True):
        self.builder_dir, self.split, self.with_label = builder_dir, split, with_label
        builder = tfds.builder_from_directory(builder_dir)
        if split not in builder.info.splits:
            raise KeyError(f"{builder_dir} has splits {list(builder.info.splits)}, not {split!r}")
        self._records = builder.as_data_source(split=split, decoders=_SKIP)
        metadata = read_metadata(builder_dir)
        self.class_names = tuple(metadata["class_names"])
        self.class_pixels = np.asarray(metadata["class_pixels"][split], np.int64).reshape(
            len(self._records), len(self.class_names)
        )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")  # ends iteration
        record = self._records[index % len(self)]
        example = {
            "image": _decode(record["image"]),
            "class_pixels": np.asarray(record["class_pixels"], np.int64),
            "name": record["name"].decode()
            if isinstance(record["name"], bytes)
            else record["name"],
        }
        if self.with_label:
            example["label"] = _decode(record["label"])
        for key, value in record.items():
            if key not in ("image", "label", "class_pixels", "name"):
                example[key] = value.decode() if isinstance(value, bytes) else value
        return example

    def __repr__(self) -> str:
        return f"SegmentationSource({self.builder_dir!r}, {self.split!r}, n={len(self)})"


def open_split(data_dir: str, dataset: str, split: str, with_label: bool = True):
    """Opens one split of a built dataset.

    Args:
      data_dir: the `--data_dir` of the build.
      dataset: 'name/config', e.g. 'synthetic_shift/default' or 'gta5/daformer'.
      split: split name.
      with_label: decode labels.

    Returns:
      A `SegmentationSource`.
    """
    return SegmentationSource(dataset_dir(data_dir, dataset), split, with_label)
