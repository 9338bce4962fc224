"""SYNTHIA RAND-CITYSCAPES (Ros et al. 2016) as a TFDS dataset, 16 classes in the 19-class space.

`GT/LABELS/*.png` are 16-bit RGB PNGs with the class id in the first channel (DAFormer
`tools/convert_datasets/synthia.py` reads them with cv2 and takes that channel); ids map to train
ids with DAFormer's table (`labels.SYNTHIA_ID_TO_TRAIN_ID`), so terrain, truck and train never
occur. DAFormer trains at `Resize((1280, 760))`, the native size: `daformer` equals `full`.
"""

from __future__ import annotations

import glob
import os

from data_pipelines import image_io
from data_pipelines.builder_base import Item, ResizeConfig, SegmentationBuilder
from data_pipelines.labels import SYNTHIA_ID_TO_TRAIN_ID, SYNTHIA_KNOWN_IDS

LAYOUT = """\
  <manual_dir>/RGB/0000000.png ...               RGB frames (1280x760)
  <manual_dir>/GT/LABELS/0000000.png ...         16-bit PNG, class id in the first channel"""


class Synthia(SegmentationBuilder, skip_registration=True):
    """SYNTHIA RAND-CITYSCAPES synthetic frames, Cityscapes train ids (16 classes)."""

    LAYOUT = LAYOUT
    ID_TO_TRAIN_ID = SYNTHIA_ID_TO_TRAIN_ID
    KNOWN_IDS = SYNTHIA_KNOWN_IDS
    VAL_SPLITS = ()
    READ_LABEL = staticmethod(image_io.read_first_channel_16bit)
    BUILDER_CONFIGS = [
        ResizeConfig(name="full", description="Native 1280x760."),
        ResizeConfig(
            name="daformer",
            description="DAFormer scale (1280, 760): the native size.",
            train_scale=(1280, 760),
        ),
    ]

    def list_items(self, root: str) -> dict[str, list[Item]]:
        image_dir = self.require_dir(os.path.join(root, "RGB"))
        label_dir = self.require_dir(os.path.join(root, "GT", "LABELS"))
        items = []
        for image in sorted(glob.glob(os.path.join(image_dir, "*.png"))):
            stem = os.path.splitext(os.path.basename(image))[0]
            items.append(Item(stem, image, os.path.join(label_dir, stem + ".png")))
        return {"train": items}
