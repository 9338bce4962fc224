"""Dark Zurich (Sakaridis et al. 2019) as a TFDS dataset: unlabelled night / twilight / day
training images with their day-night correspondence, and the labelled night val split.

Layout as the Dark_Zurich_train_anon + Dark_Zurich_val_anon archives merged into one folder (the
layout SePiCo's `configs/_base_/datasets/uda_cityscapes_to_dark_zurich_*.py` and
`mmseg/models/uda/sepico_dark.py` read). A correspondence CSV row is
`train/night/<seq>/<name>,train/day/<seq>/<name>` (names without `_rgb_anon.png`); the night
examples carry the matching day image's name in `corresp_day` ('' when none). Val labels are
`*_gt_labelIds.png` mapped with the Cityscapes table. The `daformer` config resizes keep-ratio into
1280×720 (SePiCo's Dark Zurich scale, 1920×1080 → 1280×720), val labels stay 1920×1080.

`DayNightPairs` joins the two training splits at read time: each `train_night` example gains
`day_image`, the `train_day` image its `corresp_day` names (both splits are built at the same
scale), so existing builds serve the day-night pairs that SePiCo's night variant trains on.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence

import tensorflow_datasets as tfds

from data_pipelines.builder_base import Item, ResizeConfig, SegmentationBuilder
from data_pipelines.labels import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_KNOWN_IDS

LAYOUT = """\
  <manual_dir>/rgb_anon/train/{night,twilight,day}/<seq>/<seq>_frame_<n>_rgb_anon.png
  <manual_dir>/corresp/train/night/<seq>.csv     rows: train/night/<seq>/<name>,train/day/<seq>/<name>
  <manual_dir>/rgb_anon/val/night/<seq>/<name>_rgb_anon.png
  <manual_dir>/gt/val/night/<seq>/<name>_gt_labelIds.png"""

IMAGE_SUFFIX = "_rgb_anon.png"
LABEL_SUFFIX = "_gt_labelIds.png"


def read_correspondences(corresp_dir: str) -> dict[str, str]:
    """Reads every CSV under `corresp_dir` into {night key: day key}.

    Args:
      corresp_dir: `<root>/corresp/train/night`.

    Returns:
      {'train/night/<seq>/<name>': 'train/day/<seq>/<name>'}.
    """
    pairs = {}
    for path in sorted(glob.glob(os.path.join(corresp_dir, "**", "*.csv"), recursive=True)):
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) < 2:
                    continue
                night, day = row[0].strip(), row[1].strip()
                if pairs.get(night, day) != day:
                    raise ValueError(f"{path}: {night} has two day correspondences")
                pairs[night] = day
    return pairs


class DarkZurich(SegmentationBuilder, skip_registration=True):
    """Dark Zurich night-time driving (train unlabelled, val labelled), Cityscapes train ids."""

    LAYOUT = LAYOUT
    ID_TO_TRAIN_ID = CITYSCAPES_ID_TO_TRAIN_ID
    KNOWN_IDS = CITYSCAPES_KNOWN_IDS
    VAL_SPLITS = ("val",)
    EXTRA_FEATURES = {"corresp_day": tfds.features.Text()}
    BUILDER_CONFIGS = [
        ResizeConfig(name="full", description="Native 1920x1080."),
        ResizeConfig(
            name="daformer",
            description="Keep-ratio into 1280x720 (train and val images), val labels 1920x1080.",
            train_scale=(1280, 720),
            val_scale=(1280, 720),
        ),
    ]

    def list_items(self, root: str) -> dict[str, list[Item]]:
        corresp_dir = os.path.join(root, "corresp", "train", "night")
        pairs = read_correspondences(self.require_dir(corresp_dir))
        splits = {}
        for condition in ("night", "twilight", "day"):
            image_dir = self.require_dir(os.path.join(root, "rgb_anon", "train", condition))
            items = []
            for image in sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX))):
                seq = os.path.basename(os.path.dirname(image))
                stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
                day = pairs.get(f"train/{condition}/{seq}/{stem}", "")
                items.append(Item(stem, image, None, {"corresp_day": day}))
            splits[f"train_{condition}"] = items
        image_dir = self.require_dir(os.path.join(root, "rgb_anon", "val", "night"))
        label_dir = self.require_dir(os.path.join(root, "gt", "val", "night"))
        items = []
        for image in sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX))):
            seq = os.path.basename(os.path.dirname(image))
            stem = os.path.basename(image)[: -len(IMAGE_SUFFIX)]
            label = os.path.join(label_dir, seq, stem + LABEL_SUFFIX)
            items.append(Item(stem, image, label, {"corresp_day": ""}))
        splits["val"] = items
        return splits


class MissingCorrespondenceError(ValueError):
    """A night training image has no day image to pair with."""


def _field(source: Sequence[dict], index: int, key: str) -> str:
    """One text field of example `index`, without decoding its PNGs where the source allows."""
    records = getattr(source, "_records", None)  # sources.SegmentationSource: raw records
    value = records[index][key] if records is not None else source[index][key]
    return value.decode() if isinstance(value, bytes) else value


class DayNightPairs(Sequence):
    """Night training examples with their corresponding day image, as `Sequence[dict]`.

    Element i is `night[i]` plus `day_key`: the image of the `day` example whose name is the last
    path part of `night[i]['corresp_day']` (the correspondence CSV's day entry). Every night
    example must have a day image: SePiCo's night variant reads one for each.

    Args:
      night: the `train_night` split (e.g. `sources.open_split(..., 'train_night',
        with_label=False)`), examples with `corresp_day`.
      day: the `train_day` split of the same build (same scale as `night`).
      day_key: the key the day image gets.

    Raises:
      MissingCorrespondenceError: a night image without a CSV row, or whose day image is not in
        `day`; the message names the first such image and the count.
    """

    def __init__(self, night: Sequence[dict], day: Sequence[dict], day_key: str = "day_image"):
        self.night, self.day, self.day_key = night, day, day_key
        by_name: dict[str, int] = {}
        for i in range(len(day)):
            by_name.setdefault(_field(day, i, "name"), i)
        self.day_index, unpaired, absent = [], [], []
        for i in range(len(night)):
            corresp = _field(night, i, "corresp_day")
            index = by_name.get(corresp.rsplit("/", 1)[-1]) if corresp else None
            if index is None:
                (absent if corresp else unpaired).append((_field(night, i, "name"), corresp))
            self.day_index.append(index)
        if unpaired:
            name = unpaired[0][0]
            raise MissingCorrespondenceError(
                f"night image {name}{IMAGE_SUFFIX} has no row in corresp/train/night/*.csv "
                f"({len(unpaired)} of {len(night)} night images have none); build Dark Zurich "
                "from a download that includes the corresp folder of Dark_Zurich_train_anon.zip"
            )
        if absent:
            name, corresp = absent[0]
            raise MissingCorrespondenceError(
                f"night image {name}{IMAGE_SUFFIX} pairs with {corresp}{IMAGE_SUFFIX}, which the "
                f"train_day split lacks ({len(absent)} of {len(night)} night images affected); "
                "rebuild Dark Zurich with every rgb_anon/train/day image readable"
            )

    def __len__(self) -> int:
        return len(self.night)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.night[index])
        example[self.day_key] = self.day[self.day_index[index]]["image"]
        return example

    def __repr__(self) -> str:
        return f"DayNightPairs({self.night!r}, {self.day!r})"


def open_day_night_pairs(
    data_dir: str, dataset: str = "dark_zurich/daformer", day_key: str = "day_image"
) -> DayNightPairs:
    """The `train_night` split of a Dark Zurich build paired with its `train_day` images.

    Args:
      data_dir: the `--data_dir` of the build.
      dataset: 'dark_zurich/<config>'.
      day_key: the key the day image gets.

    Returns:
      `DayNightPairs` over unlabelled night examples (image, class_pixels, name, corresp_day,
      and `day_key`).
    """
    from data_pipelines import sources

    night = sources.open_split(data_dir, dataset, "train_night", with_label=False)
    day = sources.open_split(data_dir, dataset, "train_day", with_label=False)
    return DayNightPairs(night, day, day_key)
