"""Build CLI: converts a dataset from its original layout into TFDS ArrayRecord files.

  python -m data_pipelines.build --dataset gta5 --manual_dir ~/data/gta --data_dir ~/tfds \
      --resize daformer --num_workers 8
  python -m data_pipelines.build --dataset synthetic_shift --data_dir ~/tfds

`--resize` is `daformer` (each dataset's DAFormer training scale), `full` (native size) or `WxH`
(keep-ratio into W×H; validation labels always stay at full resolution). The result is read
back with `data_pipelines.sources.open_split(data_dir, '<dataset>/<config>', split)`.
Re-running with the same arguments finds the finished build and only prints its summary.
Exit status: 0 built or found, 2 bad input (the message names the file or the expected layout).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import tensorflow_datasets as tfds

from data_pipelines import image_io
from data_pipelines.builder_base import LayoutError, SizeMismatchError, resize_config
from data_pipelines.cityscapes import Cityscapes
from data_pipelines.dark_zurich import DarkZurich
from data_pipelines.folder import Folder
from data_pipelines.gta5 import Gta5
from data_pipelines.synthetic_shift import SyntheticShift, synthetic_config
from data_pipelines.synthia import Synthia

BUILDERS = {
    "gta5": Gta5,
    "cityscapes": Cityscapes,
    "synthia": Synthia,
    "dark_zurich": DarkZurich,
    "folder": Folder,
    "synthetic_shift": SyntheticShift,
}


def parse_size(text: str) -> tuple[int, int]:
    """'1280x720' -> (1280, 720)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected WxH (e.g. 1280x720), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def make_builder(args: argparse.Namespace):
    """The builder instance (with its config) for the parsed command line."""
    builder_cls = BUILDERS[args.dataset]
    common = dict(data_dir=args.data_dir, file_format="array_record")
    if args.dataset == "synthetic_shift":
        custom = (args.size, args.num_train, args.num_val, args.seed, args.shift_strength)
        if any(v is not None for v in custom):
            width, height = parse_size(args.size or "512x256")
            config = synthetic_config(
                height,
                width,
                400 if args.num_train is None else args.num_train,
                100 if args.num_val is None else args.num_val,
                args.seed or 0,
                1.0 if args.shift_strength is None else args.shift_strength,
            )
        else:
            config = args.config or "default"
        return builder_cls(config=config, **common)
    if args.manual_dir is None:
        raise LayoutError(f"--manual_dir is required for {args.dataset}")
    resize = args.resize
    if args.dataset == "folder":
        scale = None if resize in ("full", None) else parse_size(resize)
        name = args.name + ("" if scale is None else f"_{scale[0]}x{scale[1]}")
        config = resize_config(scale, name=name)
    elif resize in ("full", "daformer"):
        config = resize
    else:
        config = resize_config(parse_size(resize))
    return builder_cls(
        config=config,
        manual_dir=args.manual_dir,
        skip_corrupt=args.skip_corrupt,
        num_workers=args.num_workers,
        **common,
    )


def format_summary(builder, metadata: dict, seconds: float | None) -> str:
    """Human-readable summary of a build from its metadata."""
    names = metadata.get("class_names", [])
    lines = [f"dataset {builder.name}/{builder.builder_config.name} at {builder.data_dir}"]
    for split, stats in metadata.get("summary", {}).items():
        seen = [names[c] for c, n in enumerate(stats["class_pixels"]) if n > 0]
        missing = [names[c] for c, n in enumerate(stats["class_pixels"]) if n == 0]
        unknown = stats["unknown_ids"]
        lines.append(f"  {split}: {stats['images']} images")
        lines.append(f"    classes seen ({len(seen)}/{len(names)}): {', '.join(seen) or '-'}")
        if missing and len(seen):
            lines.append(f"    classes absent: {', '.join(missing)}")
        total_unknown = sum(unknown.values())
        lines.append(
            f"    unmapped ids: {total_unknown} pixels"
            + (
                f" ({', '.join(f'id {k}: {v}' for k, v in unknown.items())}) -> 255"
                if unknown
                else ""
            )
        )
        for key in ("skipped_corrupt", "skipped_mismatch", "skipped_missing_label"):
            if stats.get(key):
                shown = ", ".join(stats[key][:5]) + (" ..." if len(stats[key]) > 5 else "")
                lines.append(f"    {key.replace('_', ' ')}: {len(stats[key])} ({shown})")
    if seconds is not None:
        lines.append(f"  built in {seconds:.1f} s")
    return "\n".join(lines)


def build(args: argparse.Namespace, stream=None) -> int:
    """Builds (or finds) the dataset and prints the summary; returns the exit status."""
    stream = stream or sys.stdout
    try:
        builder = make_builder(args)
        done = os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))
        start = time.time()
        if done:
            stream.write(f"already built, reusing {builder.data_dir}\n")
        else:
            if hasattr(builder, "checked_items") and args.dataset != "synthetic_shift":
                builder.checked_items()  # Fail on a bad layout before TFDS creates folders.
            builder.download_and_prepare(file_format="array_record")
        metadata = tfds.builder_from_directory(builder.data_dir).info.metadata or {}
        stream.write(format_summary(builder, dict(metadata), None if done else time.time() - start))
        stream.write("\n")
        return 0
    except (LayoutError, SizeMismatchError, image_io.CorruptImageError, FileNotFoundError) as e:
        sys.stderr.write(f"\nerror: {e}\n")
        if isinstance(e, image_io.CorruptImageError):
            sys.stderr.write("(pass --skip_corrupt to skip unreadable files and count them)\n")
        return 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--manual_dir", help="the dataset in its original layout")
    parser.add_argument("--data_dir", required=True, help="where TFDS writes the build")
    parser.add_argument("--resize", default="full", help="'full', 'daformer' or WxH")
    parser.add_argument("--skip_corrupt", action="store_true", help="skip and count bad files")
    parser.add_argument(
        "--num_workers", type=int, default=0, help="processes decoding / encoding (0: none)"
    )
    parser.add_argument("--name", default="default", help="folder: name of this dataset")
    parser.add_argument("--config", help="synthetic_shift: 'default', 'mild' or 'tiny'")
    parser.add_argument("--size", help="synthetic_shift: WxH of the images (default 512x256)")
    parser.add_argument("--num_train", type=int, help="synthetic_shift: train images per domain")
    parser.add_argument("--num_val", type=int, help="synthetic_shift: val images per domain")
    parser.add_argument("--seed", type=int, help="synthetic_shift: generator seed")
    parser.add_argument(
        "--shift_strength", type=float, help="synthetic_shift: target style strength (1)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    tfds.disable_progress_bar()  # Our own bar prints the rate and ETA per split.
    return build(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
