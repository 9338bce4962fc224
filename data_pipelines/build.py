"""Build CLI: converts a dataset from its original layout into TFDS ArrayRecord files.

  python -m data_pipelines.build --dataset gta5 --manual_dir ~/data/gta --data_dir ~/tfds \
      --resize daformer --num_workers 8
  python -m data_pipelines.build --dataset synthetic_shift --data_dir ~/tfds

`--resize` is `daformer` (each dataset's DAFormer training scale), `full` (native size) or `WxH`
(keep-ratio into W×H; validation labels always stay at full resolution). The result is read
back with `data_pipelines.sources.open_split(data_dir, '<dataset>/<config>', split)`.
Re-running with the same arguments finds the finished build and only prints its summary.
Exit status: 0 built or found, 2 bad input (one `error:` line on stderr naming the file, or the
expected layout), 130 interrupted. A build that fails or is interrupted removes every folder it
created under --data_dir, so what remains is either a finished build or nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import time

import tensorflow_datasets as tfds

from data_pipelines import image_io
from data_pipelines.builder_base import LayoutError, SizeMismatchError, resize_config
from data_pipelines.cityscapes import Cityscapes
from data_pipelines.dark_zurich import DarkZurich
from data_pipelines.folder import ClassTableError, Folder
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


class UsageError(ValueError):
    """A command-line value that is not valid (for this dataset)."""


def parse_size(text: str, flag: str = "--resize", allowed: str = "") -> tuple[int, int]:
    """'1280x720' -> (1280, 720); UsageError naming `flag` (and the `allowed` words) otherwise."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or not int(match.group(1)) or not int(match.group(2)):
        raise UsageError(f"{flag} {text!r}: expected {allowed}WxH (e.g. 1280x720)")
    return int(match.group(1)), int(match.group(2))


def make_builder(args: argparse.Namespace):
    """The builder instance (with its config) for the parsed command line."""
    builder_cls = BUILDERS[args.dataset]
    common = dict(data_dir=args.data_dir, file_format="array_record")
    if args.dataset == "synthetic_shift":
        custom = (args.size, args.num_train, args.num_val, args.seed, args.shift_strength)
        if any(v is not None for v in custom):
            width, height = parse_size(args.size or "512x256", "--size")
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
            if config not in builder_cls.builder_configs:
                names = ", ".join(builder_cls.builder_configs)
                raise UsageError(f"--config {config!r}: expected one of {names}")
        return builder_cls(config=config, **common)
    if args.manual_dir is None:
        raise LayoutError(f"--manual_dir is required for {args.dataset}")
    resize = args.resize
    if args.dataset == "folder":
        # A user's folder has no DAFormer scale of its own.
        scale = None if resize in ("full", None) else parse_size(resize, allowed="full or ")
        name = args.name + ("" if scale is None else f"_{scale[0]}x{scale[1]}")
        config = resize_config(scale, name=name)
    elif resize in ("full", "daformer"):
        config = resize
    else:
        config = resize_config(parse_size(resize, allowed="full, daformer or "))
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


# Bad input: reported as one `error:` line and exit status 2, never as a traceback.
BAD_INPUT = (
    LayoutError,
    SizeMismatchError,
    image_io.CorruptImageError,
    image_io.LabelFormatError,
    ClassTableError,
    UsageError,
    FileNotFoundError,
)


def _entries(path: str) -> set[str] | None:
    """The names in folder `path`, or None if it does not exist."""
    try:
        return set(os.listdir(path))
    except OSError:
        return None


@contextlib.contextmanager
def removed_on_failure(builder):
    """Removes the folders a build created under --data_dir if the body raises anything.

    TFDS writes into `<data_dir>/<name>/<config>/<version>.incomplete.*/` (renamed to `<version>`
    at the end) and creates `<data_dir>/<name>/.config/` and `<data_dir>/downloads/extracted/` on
    the way. After a failure none of these may remain when they were new (an empty
    `<data_dir>/gta5/full/` looks like a build), yet other builds into the same --data_dir, even
    ones running now, must stay untouched. So: every new entry of this config's own folder goes
    (the folder too if it is new); the dataset's `.config` goes if new and no other config of the
    dataset appeared meanwhile; the shared folders (data_dir, downloads, the dataset's folder) go
    only if new and then empty. Nothing that existed before is touched.
    """
    version_dir = os.fspath(builder.data_dir)
    config_dir = os.path.dirname(version_dir)
    name_dir = os.path.dirname(config_dir)
    root = os.path.dirname(name_dir)
    downloads = os.path.join(root, "downloads")
    # Deepest first; `root`'s missing parents too (TFDS creates the whole --data_dir path).
    shared = [os.path.join(downloads, "extracted"), os.path.join(downloads, "manual"), downloads]
    shared += [name_dir, root]
    parent = os.path.dirname(root)
    while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
        shared.append(parent)
        parent = os.path.dirname(parent)
    before = {p: _entries(p) for p in (config_dir, *shared)}
    try:
        yield
    except BaseException:
        if before[config_dir] is None:
            shutil.rmtree(config_dir, ignore_errors=True)
        else:
            for entry in (_entries(config_dir) or set()) - before[config_dir]:
                shutil.rmtree(os.path.join(config_dir, entry), ignore_errors=True)
        others = (_entries(name_dir) or set()) - (before[name_dir] or set())
        others -= {os.path.basename(config_dir), ".config"}
        if not others and ".config" not in (before[name_dir] or set()):
            shutil.rmtree(os.path.join(name_dir, ".config"), ignore_errors=True)
        for path in shared:
            if before[path] is None:
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # only if empty: another build may be writing there
        raise


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
            with removed_on_failure(builder):
                if hasattr(builder, "checked_items") and args.dataset != "synthetic_shift":
                    builder.checked_items()  # Fail on a bad layout before TFDS creates folders.
                builder.download_and_prepare(file_format="array_record")
        metadata = tfds.builder_from_directory(builder.data_dir).info.metadata or {}
        stream.write(format_summary(builder, dict(metadata), None if done else time.time() - start))
        stream.write("\n")
        return 0
    except BAD_INPUT as e:
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
    args = parse_args(argv)
    try:
        return build(args)
    except KeyboardInterrupt:
        # `build` has removed the partial build; a traceback would only hide that line.
        sys.stderr.write("\ninterrupted; an unfinished build was removed\n")
        return 130


def cli() -> None:
    """The `pgpc-build-data` command (`python -m data_pipelines.build`)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
