"""Source-pipeline throughput at DAFormer's real shapes, by number of worker processes.

Writes a GTA5-layout folder of 1280×704 photographic-style PNG frames with Cityscapes label ids
(synthetic_scenes, so PNG sizes and decode cost are like real frames rather than flat colours),
builds it with the gta5 builder, then times `pipeline.source_dataset` exactly as DAFormer's
source loader: RCS (T = 0.01, min_pixels = 3000, min_crop_ratio = 0.5), RandomCrop 512 with
cat_max_ratio 0.75, flip, normalisation (float32) or uint8 output, batch 2.

  python benchmarks/input_pipeline.py --work_dir /tmp/pipeline_bench [--images 24] [--batches 40]

Prints a markdown table of images/s per setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from data_pipelines import build, image_io, pipeline, sources, synthetic_scenes  # noqa: E402
from data_pipelines.labels import CITYSCAPES_ID_TO_TRAIN_ID  # noqa: E402

HEIGHT, WIDTH = 704, 1280


def write_gta_folder(root: str, count: int) -> None:
    """GTA5 layout (`images/`, `labels/` with Cityscapes ids) of generated 1280×704 frames."""
    train_to_id = np.full(256, 0, np.uint8)  # ignore -> id 0 ("unlabeled")
    for raw_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
        train_to_id[train_id] = raw_id
    for i in range(count):
        rng = np.random.default_rng([7, i])
        label, albedo, geometry = synthetic_scenes.sample_scene(rng, HEIGHT, WIDTH)
        image = synthetic_scenes.render_target(rng, label, albedo, geometry)
        name = f"{i + 1:05d}.png"
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        os.makedirs(os.path.join(root, "labels"), exist_ok=True)
        with open(os.path.join(root, "images", name), "wb") as f:
            f.write(image_io.encode_png(image, compress_level=6))
        with open(os.path.join(root, "labels", name), "wb") as f:
            f.write(image_io.encode_png(train_to_id[label], compress_level=6))


def measure(source, class_pixels, workers: int, threads: int, normalize: bool, batches: int):
    """Images per second after a warm-up of 5 batches (and worker start-up)."""
    dataset = pipeline.source_dataset(source, batch_size=2, crop_size=(512, 512),
                                      scale=(1280, 720), class_pixels=class_pixels,
                                      normalize=normalize, seed=0)  # fmt: skip
    iterator = pipeline.make_iterator(dataset, num_workers=workers, num_threads=threads,
                                      prefetch_batches=4)  # fmt: skip
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape == (2, 512, 512, 3)
    return 2 * batches / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/pipeline_bench")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument(
        "--workers",
        default="",
        help="comma-separated worker counts (2 threads, float32 and uint8 each) instead of the grid",
    )
    args = parser.parse_args()
    manual_dir = os.path.join(args.work_dir, "gta_layout")
    if not os.path.isdir(os.path.join(manual_dir, "labels")):
        start = time.time()
        write_gta_folder(manual_dir, args.images)
        print(f"wrote {args.images} frames in {time.time() - start:.0f} s")
    data_dir = os.path.join(args.work_dir, "tfds")
    status = build.main(["--dataset", "gta5", "--manual_dir", manual_dir, "--data_dir", data_dir])
    assert status == 0
    source = sources.open_split(data_dir, "gta5/full", "train")
    sizes = [os.path.getsize(os.path.join(manual_dir, 'images', f))
             for f in os.listdir(os.path.join(manual_dir, 'images'))]  # fmt: skip
    print(f'{len(source)} frames {WIDTH}x{HEIGHT}, mean PNG {np.mean(sizes) / 1e6:.2f} MB, '
          f'{os.cpu_count()} CPUs')  # fmt: skip
    # A few dozen frames may lack an image with > 3000 px of some rare class (DAFormer would
    # assert); leave such classes out of the RCS draw, as if they were absent.
    class_pixels = source.class_pixels.copy()
    absent = ~(class_pixels > pipeline.DAFORMER_RCS.min_pixels).any(axis=0)
    class_pixels[:, absent] = 0
    print(f"classes without an RCS candidate, left out: {list(np.flatnonzero(absent))}")
    rows = []
    grid = (
        (0, 1, True),
        (0, 2, True),
        (0, 4, True),
        (1, 1, True),
        (2, 1, True),
        (2, 2, True),
        (0, 2, False),
        (2, 2, False),
    )
    if args.workers:
        counts = [int(w) for w in args.workers.split(",")]
        grid = [(w, 2, normalize) for w in counts for normalize in (True, False)]
    for workers, threads, normalize in grid:
        rate = measure(source, class_pixels, workers, threads, normalize, args.batches)
        rows.append((workers, threads, "float32" if normalize else "uint8", rate))
        print(f"workers={workers} threads={threads} {rows[-1][2]}: {rate:.1f} images/s", flush=True)
    print(f"load average of this shared machine: {os.getloadavg()}")
    print("\n| workers | threads / process | output | images/s |\n|---|---|---|---|")
    for workers, threads, output, rate in rows:
        print(f"| {workers} | {threads} | {output} | {rate:.1f} |")


if __name__ == "__main__":
    main()
