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
`metadata.json` without touching the records (rare-class sampling needs it up front), as are
`source.class_names` and `source.palette` (the class set a run takes from its data).

A dataset that is not built raises `DatasetNotBuiltError` (a FileNotFoundError) whose message is
the exact build command for it; a split the build lacks raises `UnknownSplitError` listing the
splits it has.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

_SKIP = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}


class DatasetNotBuiltError(FileNotFoundError):
    """No build of the dataset under data_dir; the message gives the command that builds it."""


class UnknownSplitError(ValueError):
    """The build has no such split; the message lists the splits it has."""


# Datasets built from a download (`--manual_dir`), with the name of that download.
_DOWNLOADS = {
    "gta5": "GTA5",
    "cityscapes": "Cityscapes",
    "synthia": "SYNTHIA-RAND-CITYSCAPES",
    "dark_zurich": "Dark Zurich",
}
# synthetic_shift's custom config names, `synthetic_config`'s `<H>x<W>_n<N>_v<V>_s<S>[_k<K>]`.
SYNTHETIC_CUSTOM_NAME = re.compile(r"(\d+)x(\d+)_n(\d+)_v(\d+)_s(\d+)(?:_k([-+.\deE]+))?")


def build_command(data_dir: str, dataset: str) -> str:
    """The `python -m data_pipelines.build` command that makes `dataset` in `data_dir`.

    Args:
      data_dir: the `--data_dir` of the build.
      dataset: 'name/config[/version]', e.g. 'gta5/daformer', 'folder/mine_512x256'.

    Returns:
      The command line, with `<...>` where only the user knows the value (their download).
    """
    name, _, config = dataset.partition("/")
    config = config.split("/")[0]
    command = "python -m data_pipelines.build --dataset"
    if name in _DOWNLOADS:
        if config in ("full", ""):
            resize = ""
        elif config == "daformer" or re.fullmatch(r"\d+x\d+", config):
            resize = f" --resize {config}"
        else:  # not a config the build makes
            resize = " --resize <full, daformer or WxH>"
        return (
            f"{command} {name} --manual_dir <your {_DOWNLOADS[name]} download> "
            f"--data_dir {data_dir}{resize}"
        )
    if name == "folder":
        # The build names a resized folder dataset `<name>_<W>x<H>`.
        match = re.fullmatch(r"(.+)_(\d+x\d+)", config)
        folder_name, resize = (match[1], f" --resize {match[2]}") if match else (config, "")
        return (
            f"{command} folder --name {folder_name or '<name>'} --manual_dir <your folder> "
            f"--data_dir {data_dir}{resize}"
        )
    if name == "synthetic_shift":
        match = SYNTHETIC_CUSTOM_NAME.fullmatch(config)
        if match:
            height, width, num_train, num_val, seed, strength = match.groups()
            options = (
                f" --size {width}x{height} --num_train {num_train} --num_val {num_val} "
                f"--seed {seed}" + (f" --shift_strength {strength}" if strength else "")
            )
        else:
            options = "" if config in ("default", "") else f" --config {config}"
        return f"{command} synthetic_shift --data_dir {data_dir}{options}"
    known = ", ".join([*_DOWNLOADS, "folder", "synthetic_shift"])
    return f"{command} <one of {known}> ... --data_dir {data_dir}"


def _not_built_message(data_dir: str, dataset: str, path: str) -> str:
    """Why `dataset` was not found in `data_dir`, and the command that builds it."""
    if not os.path.isdir(data_dir):
        where = f"; the data_dir {data_dir} does not exist"
    elif not os.listdir(data_dir):
        where = f"; the data_dir {data_dir} is empty"
    else:
        built = sorted(
            {
                os.path.relpath(os.path.dirname(os.path.dirname(p)), data_dir)
                for p in glob.glob(os.path.join(data_dir, "*", "*", "*", "dataset_info.json"))
            }
        )
        where = f"; built there: {', '.join(built)}" if built else f"; nothing built in {data_dir}"
    return (
        f"no built dataset {dataset!r} at {path}{where}; build it with "
        f"`{build_command(data_dir, dataset)}` (see docs/data.md for the layout)"
    )


def dataset_dir(data_dir: str, dataset: str) -> str:
    """Resolves `data_dir` + 'name/config[/version]' to the built dataset's directory.

    Args:
      data_dir: the `--data_dir` of the build.
      dataset: e.g. 'gta5/daformer', 'synthetic_shift/default', 'cityscapes/full/1.0.0'.

    Returns:
      The directory holding dataset_info.json (the newest version if none is given).

    Raises:
      DatasetNotBuiltError: no build there; the message is the command that makes it.
    """
    data_dir = os.path.expanduser(data_dir)  # '~/tfds' as in docs/data.md
    path = os.path.join(data_dir, dataset)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    # Only finished versions: a killed build may leave `1.0.0.incomplete.*` behind.
    found = [
        (tuple(int(x) for x in version.split(".")), p)
        for p in glob.glob(os.path.join(path, "*", "dataset_info.json"))
        if re.fullmatch(r"\d+(\.\d+)*", version := os.path.basename(os.path.dirname(p)))
    ]
    versions = [p for _, p in sorted(found)]
    if not versions:
        raise DatasetNotBuiltError(_not_built_message(data_dir, dataset, path))
    return os.path.dirname(versions[-1])


def split_counts(builder_dir: str) -> dict[str, int]:
    """Images per split of a finished build, from its dataset_info.json (no record is read)."""
    splits = tfds.builder_from_directory(builder_dir).info.splits
    return {name: splits[name].num_examples for name in splits}


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
            raise UnknownSplitError(
                f"{builder_dir} has splits {sorted(builder.info.splits)}, not {split!r}"
            )
        self._records = builder.as_data_source(split=split, decoders=_SKIP)
        metadata = read_metadata(builder_dir)
        self.class_names = tuple(metadata["class_names"])
        # RGB per class (builds before the palette was recorded: None, the default colours).
        palette = metadata.get("palette")
        self.palette = tuple(tuple(int(v) for v in c) for c in palette) if palette else None
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
