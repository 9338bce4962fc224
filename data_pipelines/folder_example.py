"""A small domain pair in the `folder` layout, to try the own-data path before bringing your own
(`python -m data_pipelines.folder_example --out my_data`).

The scenes are the embedded dataset's (`synthetic_shift`: a source style and a target style of
street scenes), with their 19 classes grouped into 5 (ground, structure, vegetation, sky, agent),
written as a user's folders are:

  <out>/classes.json                    {"names": [...5 names...], "colors": [[r, g, b], ...]}
  <out>/source/images/<name>.png        source-style images
  <out>/source/labels/<name>.png        their labels: class indices 0..4, 255 = ignore
  <out>/target/images/<name>.png        target-style images, no labels
  <out>/target_val/images/<name>.png    target-style validation images
  <out>/target_val/labels/<name>.png    and their labels

Then `python -m data_pipelines.build --dataset folder --source <out>/source --target
<out>/target --target_val <out>/target_val --classes <out>/classes.json --name <name>` builds it
(README, "Your own data").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from data_pipelines import synthetic_shift
from data_pipelines.builder_base import progress
from data_pipelines.labels import CLASSES, IGNORE_INDEX

# The 5 classes and the Cityscapes classes each one groups.
GROUPS = {
    "ground": ("road", "sidewalk", "terrain"),
    "structure": ("building", "wall", "fence", "pole", "traffic light", "traffic sign"),
    "vegetation": ("vegetation",),
    "sky": ("sky",),
    "agent": ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"),
}
COLORS = ((128, 64, 128), (70, 70, 70), (107, 142, 35), (70, 130, 180), (220, 20, 60))


def group_table() -> np.ndarray:
    """uint8 [256]: Cityscapes train id -> index of its group (255 stays 255)."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for index, members in enumerate(GROUPS.values()):
        for name in members:
            table[CLASSES.index(name)] = index
    return table


def write_example_pair(
    out: str, num_train: int = 100, num_val: int = 30, size: tuple[int, int] = (256, 128)
) -> dict[str, int]:
    """Writes the pair (layout in the module docstring); returns the image count per folder.

    Args:
      out: the folder to write (created; files already there are overwritten).
      num_train: images of each domain's training folder.
      num_val: images of the target validation folder.
      size: (width, height) of the images.
    """
    width, height = size
    config = synthetic_shift.synthetic_config(height, width, num_train, num_val, seed=0)
    table = group_table()
    plan = (
        ("source", "source", "train", num_train, True),
        ("target", "target", "train", num_train, False),
        ("target_val", "target", "val", num_val, True),
    )
    for folder, _, _, _, labelled in plan:
        os.makedirs(os.path.join(out, folder, "images"), exist_ok=True)
        if labelled:
            os.makedirs(os.path.join(out, folder, "labels"), exist_ok=True)
    names = list(GROUPS)
    with open(os.path.join(out, "classes.json"), "w") as f:
        json.dump({"names": names, "colors": [list(c) for c in COLORS]}, f, indent=1)
    counts = {}
    for folder, domain, split, count, labelled in plan:
        for i in progress(range(count), f"{out}/{folder}", count):
            image, label = synthetic_shift.generate_example(config, domain, split, i)
            stem = f"{folder}_{i:05d}.png"
            Image.fromarray(image).save(os.path.join(out, folder, "images", stem))
            if labelled:
                grouped = table[np.asarray(label, np.int64)]
                Image.fromarray(grouped).save(os.path.join(out, folder, "labels", stem))
        counts[folder] = count
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the pair into")
    parser.add_argument("--num_train", type=int, default=100, help="training images per domain")
    parser.add_argument("--num_val", type=int, default=30, help="target validation images")
    parser.add_argument("--size", default="256x128", help="WxH of the images")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.split("x"))
        if width < 32 or height < 32:
            raise ValueError
    except ValueError:
        print(f"error: --size {args.size!r}: expected WxH of at least 32x32", file=sys.stderr)
        return 2
    if min(args.num_train, args.num_val) < 1:
        print("error: --num_train and --num_val must be at least 1", file=sys.stderr)
        return 2
    counts = write_example_pair(args.out, args.num_train, args.num_val, (width, height))
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
