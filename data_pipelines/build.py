"""Build CLI: converts a dataset from its original layout into TFDS ArrayRecord files.

  python -m data_pipelines.build --dataset gta5 --manual_dir ~/data/gta --data_dir ~/tfds \
      --resize daformer --num_workers 8
  python -m data_pipelines.build --dataset synthetic_shift --data_dir ~/tfds
  python -m data_pipelines.build --dataset folder --source ~/data/mine_src --target ~/data/mine_tgt \
      [--target_val ~/data/mine_val] --classes classes.json --name mine --data_dir ~/tfds
  python -m data_pipelines.build --check --dataset gta5 --data_dir ~/tfds [--resize daformer]

`--resize` is `daformer` (each dataset's DAFormer training scale), `full` (native size) or `WxH`
(keep-ratio into W×H; validation labels always stay at full resolution). The result is read
back with `data_pipelines.sources.open_split(data_dir, '<dataset>/<config>', split)`.
`folder` takes either `--manual_dir` (train / val / test folders and classes.json) or a domain
pair, `--source` / `--target` / `--classes` (and optionally `--target_val`), which builds one
dataset `folder/<name>` with splits source_train, target_train (unlabelled) and target_val
(layouts and class-file shapes: data_pipelines/folder.py).
Re-running with the same arguments finds the finished build and only prints its summary.
Exit status: 0 built or found, 2 bad input (one `error:` line on stderr naming the file, or the
expected layout), 130 interrupted. A build that fails or is interrupted removes every folder it
created under --data_dir, so what remains is either a finished build or nothing.

`--check` reads a finished build's image count per split from its metadata (no record is read)
and compares it with the released dataset's (`EXPECTED_COUNTS`; synthetic_shift: what its config
generates), one line per split; without `--resize` / `--config` / `--name` it checks every built
config of the dataset. Exit status: 0 all match, 1 a count differs (an `error:` line says which
and what to do), 2 not built (an `error:` line with the build command).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping

import tensorflow_datasets as tfds

from data_pipelines import image_io, sources
from data_pipelines.builder_base import (
    LayoutError,
    SizeMismatchError,
    UnknownIdError,
    resize_config,
)
from data_pipelines.cityscapes import Cityscapes
from data_pipelines.dark_zurich import DarkZurich
from data_pipelines.folder import ClassTableError, Folder, pair_usage
from data_pipelines.gta5 import Gta5
from data_pipelines.synthetic_shift import DOMAINS, SPLITS, SyntheticShift, synthetic_config
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


def synthetic_shift_config(args: argparse.Namespace):
    """synthetic_shift's config on the command line: a custom `SyntheticConfig` when any of
    --size / --num_train / --num_val / --seed / --shift_strength is given, else the --config name
    (None when absent)."""
    custom = (args.size, args.num_train, args.num_val, args.seed, args.shift_strength)
    if any(v is not None for v in custom):
        width, height = parse_size(args.size or "512x256", "--size")
        return synthetic_config(
            height,
            width,
            400 if args.num_train is None else args.num_train,
            100 if args.num_val is None else args.num_val,
            args.seed or 0,
            1.0 if args.shift_strength is None else args.shift_strength,
        )
    if args.config is not None and args.config not in SyntheticShift.builder_configs:
        names = ", ".join(SyntheticShift.builder_configs)
        raise UsageError(f"--config {args.config!r}: expected one of {names}")
    return args.config


def folder_config(name: str, resize: str | None):
    """The `folder` config: named `<name>` at native size, `<name>_<W>x<H>` for --resize WxH."""
    # A user's folder has no DAFormer scale of its own.
    scale = None if resize in ("full", None) else parse_size(resize, allowed="full or ")
    return resize_config(scale, name=name + ("" if scale is None else f"_{scale[0]}x{scale[1]}"))


def download_config(resize: str):
    """The config of a downloaded dataset for --resize: 'full', 'daformer' or a WxH config."""
    if resize in ("full", "daformer"):
        return resize
    return resize_config(parse_size(resize, allowed="full, daformer or "))


class _WithoutCustomConfigNote(logging.Filter):
    """Drops TFDS's "Using custom data configuration: ResizeConfig(...)" warning: every folder,
    WxH and custom-size build has a config made on the command line, which is no problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


def _quiet_custom_config_note() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _WithoutCustomConfigNote) for f in absl_logger.filters):
        absl_logger.addFilter(_WithoutCustomConfigNote())


def make_builder(args: argparse.Namespace):
    """The builder instance (with its config) for the parsed command line."""
    _quiet_custom_config_note()
    builder_cls = BUILDERS[args.dataset]
    common = dict(data_dir=args.data_dir, file_format="array_record")
    pair = {key: getattr(args, key) for key in ("source", "target", "target_val", "classes")}
    if args.dataset != "folder" and any(v is not None for v in pair.values()):
        raise UsageError("--source, --target, --target_val and --classes are for --dataset folder")
    if args.dataset == "synthetic_shift":
        return builder_cls(config=synthetic_shift_config(args) or "default", **common)
    if args.dataset == "folder":
        problem = pair_usage(args.manual_dir, **pair)
        if problem is not None:
            raise UsageError(problem)
        config = folder_config(args.name or "default", args.resize)
        common.update({key: value for key, value in pair.items() if value is not None})
    elif args.manual_dir is None:
        raise LayoutError(f"--manual_dir is required for {args.dataset}")
    else:
        config = download_config(args.resize or "full")
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
        if not stats.get("labelled", True):  # a build from before the key prints as before
            lines.append("    no labels")
        else:
            lines.append(f"    classes seen ({len(seen)}/{len(names)}): {', '.join(seen) or '-'}")
            if missing and len(seen):
                lines.append(f"    classes absent: {', '.join(missing)}")
            shown = ", ".join(f"id {k}: {v}" for k, v in unknown.items())
            lines.append(
                f"    unmapped ids: {sum(unknown.values())} pixels"
                + (f" ({shown}) -> 255" if unknown else "")
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
    UnknownIdError,
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


def _check_same_classes(builder) -> None:
    """A finished `folder` build found again under the same name must have been built with the
    same class names and colours: a corrected class file would otherwise be silently ignored."""
    stored = sources.read_metadata(os.fspath(builder.data_dir))
    names, palette = stored.get("class_names"), stored.get("palette")
    if names != list(builder.CLASS_NAMES) or (
        palette is not None and palette != [list(c) for c in builder.palette]
    ):
        raise UsageError(
            f"{builder.data_dir} was built with another class file (classes {names}); this one "
            f"gives {list(builder.CLASS_NAMES)} (or other colours): build it under another "
            f"--name, or remove {os.path.dirname(os.fspath(builder.data_dir))} and build again"
        )


def build(args: argparse.Namespace, stream=None) -> int:
    """Builds (or finds) the dataset and prints the summary; returns the exit status."""
    stream = stream or sys.stdout
    try:
        builder = make_builder(args)
        done = os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))
        start = time.time()
        if done:
            if args.dataset == "folder":
                _check_same_classes(builder)
            stream.write(f"already built, reusing {builder.data_dir}\n")
        else:
            with removed_on_failure(builder):
                if hasattr(builder, "checked_items") and args.dataset != "synthetic_shift":
                    builder.checked_items()  # Fail on a bad layout before TFDS creates folders.
                # TFDS's own bars and its "Downloading and preparing dataset Unknown size"
                # line are left out: the builders print their progress with rate and ETA.
                tfds.disable_progress_bar()
                with contextlib.redirect_stdout(io.StringIO()):
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


# ------------------------------------------------------------------------------------------------
# --check: a finished build's image counts against the released dataset's.

# Images per split of each downloaded dataset as released; every --resize keeps every image.
# GTA5: "Playing for Data", 24,966 frames. Cityscapes: gtFine train / val. SYNTHIA:
# RAND-CITYSCAPES, 9,400 frames. Dark Zurich (Sakaridis et al.): 2,416 night and 2,920 twilight
# training images, 50 labelled val images; `train_day` is listed without a count. docs/data.md
# shows the same table.
EXPECTED_COUNTS = {
    "gta5": {"train": 24_966},
    "cityscapes": {"train": 2_975, "val": 500},
    "synthia": {"train": 9_400},
    "dark_zurich": {"train_night": 2_416, "train_twilight": 2_920, "val": 50},
}

# What --manual_dir must hold to give those counts (docs/data.md, "Getting the datasets").
DOWNLOAD_CONTENTS = {
    "gta5": "all ten image archives and all ten label archives (01_images.zip .. 10_images.zip, "
    "01_labels.zip .. 10_labels.zip) unpacked into images/ and labels/",
    "cityscapes": "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unpacked into one "
    "folder",
    "synthia": "SYNTHIA-RAND-CITYSCAPES unpacked whole (RGB/ and GT/LABELS/)",
    "dark_zurich": "Dark_Zurich_train_anon.zip and Dark_Zurich_val_anon.zip unpacked into one "
    "folder",
}


def expected_counts(
    dataset: str, config: str, table: Mapping[str, Mapping[str, int]] = EXPECTED_COUNTS
) -> dict[str, int]:
    """Images per split that a build of `dataset/config` must hold.

    Args:
      dataset: builder name, e.g. 'gta5'.
      config: its config name, e.g. 'daformer', 'tiny', '64x128_n12_v4_s0'.
      table: the released counts, {dataset: {split: images}}.

    Returns:
      `table[dataset]`; for synthetic_shift (when the table lacks it) what the config generates,
      `num_train` / `num_val` per domain; {} where nothing is known (a `folder` dataset).
    """
    if dataset in table:
        return dict(table[dataset])
    if dataset != "synthetic_shift":
        return {}
    named = SyntheticShift.builder_configs.get(config)
    if named is not None:
        counts = {"train": named.num_train, "val": named.num_val}
    elif match := sources.SYNTHETIC_CUSTOM_NAME.fullmatch(config):
        counts = {"train": int(match[3]), "val": int(match[4])}
    else:
        return {}
    return {f"{domain}_{split}": counts[split] for domain in DOMAINS for split in SPLITS}


def built_configs(data_dir: str, dataset: str) -> list[str]:
    """The configs of `dataset` with a finished build in `data_dir`, sorted."""
    configs = []
    for config in sorted(_entries(os.path.join(os.path.expanduser(data_dir), dataset)) or ()):
        with contextlib.suppress(sources.DatasetNotBuiltError):
            sources.dataset_dir(data_dir, f"{dataset}/{config}")
            configs.append(config)
    return configs


def _skipped_files(builder_dir: str, splits: list[str]) -> int:
    """Files the build skipped (--skip_corrupt) in `splits`, from its summary."""
    try:
        summary = sources.read_metadata(builder_dir).get("summary", {})
    except (OSError, ValueError):
        return 0
    keys = ("skipped_corrupt", "skipped_mismatch", "skipped_missing_label")
    return sum(len(summary.get(split, {}).get(key, [])) for split in splits for key in keys)


def _mismatch_advice(
    data_dir: str, dataset: str, config: str, builder_dir: str, short: list[str], skipped: int
) -> str:
    """What to do about a build whose counts differ: the download to complete, then a rebuild."""
    steps = []
    if skipped:
        steps.append(
            f"the build skipped {skipped} unreadable or unlabelled file"
            f"{'s' if skipped > 1 else ''} (--skip_corrupt; its summary names them): "
            "re-download those"
        )
    if short and dataset in DOWNLOAD_CONTENTS:
        steps.append(f"check that --manual_dir holds {DOWNLOAD_CONTENTS[dataset]}")
    elif not short and dataset in DOWNLOAD_CONTENTS:
        steps.append("--manual_dir holds images that are not part of the release: remove them")
    rebuild = sources.build_command(data_dir, f"{dataset}/{config}")
    # The config's folder: removing only its version folder would leave an empty one behind.
    steps.append(f"then remove {os.path.dirname(builder_dir)} and rebuild: `{rebuild}`")
    return "; ".join(steps)


def check(
    data_dir: str,
    dataset: str,
    config: str | None = None,
    table: Mapping[str, Mapping[str, int]] = EXPECTED_COUNTS,
    stream=None,
) -> int:
    """Compares the image count of each split of a finished build with the expected one.

    Prints `<dataset>/<config> at <dir>`, then one line per split, `  <split>: found N, expected
    M OK|MISMATCH` (or `(no reference count)`), to `stream`; a mismatch or a missing build is
    one `error:` line on stderr saying what to do.

    Args:
      data_dir: the --data_dir of the build.
      dataset: builder name, e.g. 'gta5'.
      config: one config ('daformer', ...); None checks every built config of the dataset.
      table: the released counts, {dataset: {split: images}} (tests pass their fixtures' counts).
      stream: where the split lines go (stdout by default).

    Returns:
      0 all counts match, 1 some count differs, 2 nothing built.
    """
    stream = stream or sys.stdout
    configs = [config] if config else built_configs(data_dir, dataset)
    if not configs:
        suggested = {"synthetic_shift": "default", "folder": "<name>"}.get(dataset, "daformer")
        command = sources.build_command(data_dir, f"{dataset}/{suggested}")
        path = os.path.join(os.path.expanduser(data_dir), dataset)
        sys.stderr.write(
            f"error: no finished build of {dataset} in {path}; build it with `{command}`\n"
        )
        return 2
    status = 0
    for config in configs:
        builder_dir = sources.dataset_dir(data_dir, f"{dataset}/{config}")
        found = sources.split_counts(builder_dir)
        expected = expected_counts(dataset, config, table)
        stream.write(f"{dataset}/{config} at {builder_dir}\n")
        differ, short = [], []
        for split in [*found, *(s for s in expected if s not in found)]:
            if split not in expected:
                stream.write(f"  {split}: found {found[split]} (no reference count)\n")
                continue
            have = found.get(split)
            ok = have == expected[split]
            shown = "missing" if have is None else f"found {have}"
            stream.write(
                f"  {split}: {shown}, expected {expected[split]} {'OK' if ok else 'MISMATCH'}\n"
            )
            if not ok:
                differ.append(
                    f"{split} is missing"
                    if have is None
                    else f"{split} has {have} images where the release has {expected[split]}"
                )
                if have is None or have < expected[split]:
                    short.append(split)
        if differ:
            status = 1
            advice = _mismatch_advice(
                data_dir, dataset, config, builder_dir, short, _skipped_files(builder_dir, short)
            )
            sys.stderr.write(
                f"error: {dataset}/{config} differs from the released dataset: "
                f"{', '.join(differ)}; {advice}\n"
            )
    return status


def check_config(args: argparse.Namespace) -> str | None:
    """The config --check looks at: the one the build options name, None (all) when none do."""
    if args.dataset == "synthetic_shift":
        config = synthetic_shift_config(args)
        return getattr(config, "name", config)
    if args.dataset == "folder":
        return None if args.name is None else folder_config(args.name, args.resize).name
    if args.resize is None:
        return None
    config = download_config(args.resize)
    return getattr(config, "name", config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare a finished build's image counts per split with the released dataset's "
        "(exit 0 match, 1 differ, 2 not built); needs no --manual_dir",
    )
    parser.add_argument("--manual_dir", help="the dataset in its original layout")
    parser.add_argument("--data_dir", required=True, help="where TFDS writes the build")
    parser.add_argument("--resize", help="'full' (the default), 'daformer' or WxH")
    parser.add_argument("--skip_corrupt", action="store_true", help="skip and count bad files")
    parser.add_argument(
        "--num_workers", type=int, default=0, help="processes decoding / encoding (0: none)"
    )
    parser.add_argument("--name", help="folder: name of this dataset (default 'default')")
    parser.add_argument("--source", help="folder pair: labelled source DIR (images/, labels/)")
    parser.add_argument("--target", help="folder pair: target DIR (images only are read)")
    parser.add_argument("--target_val", help="folder pair: labelled target validation DIR")
    parser.add_argument("--classes", help="folder pair: the class file (JSON)")
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
    if args.check:
        try:
            return check(args.data_dir, args.dataset, check_config(args))
        except BAD_INPUT as e:  # a bad option value, or the named config is not built
            sys.stderr.write(f"error: {e}\n")
            return 2
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
