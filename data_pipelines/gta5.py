"""GTA5 (Richter et al. 2016) as a TFDS dataset: 24 966 rendered frames with Cityscapes label ids.

Reads the original download; labels are mapped id -> train id with the Cityscapes table, exactly
as DAFormer `tools/convert_datasets/gta.py`. DAFormer trains at `Resize((1280, 720))` keep-ratio,
so the `daformer` config stores 1914×1052 frames at 1280×704.
"""

from __future__ import annotations

import glob
import os

from data_pipelines.builder_base import Item, ResizeConfig, SegmentationBuilder
from data_pipelines.labels import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_KNOWN_IDS

LAYOUT = """\
  <manual_dir>/images/00001.png ... 24966.png    RGB frames
  <manual_dir>/labels/00001.png ... 24966.png    Cityscapes label ids (0..33), same file names"""


class Gta5(SegmentationBuilder, skip_registration=True):
    """GTA5 synthetic driving frames, Cityscapes train ids."""

    LAYOUT = LAYOUT
    ID_TO_TRAIN_ID = CITYSCAPES_ID_TO_TRAIN_ID
    KNOWN_IDS = CITYSCAPES_KNOWN_IDS
    VAL_SPLITS = ()
    BUILDER_CONFIGS = [
        ResizeConfig(name="full", description="Native 1914x1052."),
        ResizeConfig(
            name="daformer",
            description="DAFormer training scale: keep-ratio into 1280x720 (1280x704).",
            train_scale=(1280, 720),
        ),
    ]

    def list_items(self, root: str) -> dict[str, list[Item]]:
        image_dir = self.require_dir(os.path.join(root, "images"))
        label_dir = self.require_dir(os.path.join(root, "labels"))
        items = []
        for image in sorted(glob.glob(os.path.join(image_dir, "*.png"))):
            stem = os.path.splitext(os.path.basename(image))[0]
            items.append(Item(stem, image, os.path.join(label_dir, stem + ".png")))
        return {"train": items}
