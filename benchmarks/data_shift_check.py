"""Is synthetic_shift's domain shift real and learnable? Source-only vs target-supervised training.

Trains the same small conv net (five 3×3 convs, ~0.1 M parameters) twice on whole images
downscaled to 64×128 (so it runs in minutes on a CPU; flips as augmentation), once on `source_train` (source-only) and once on `target_train` with its
labels (the oracle), and reports mIoU (19 classes, nanmean over classes present) on `source_val`
and `target_val`, with predictions upsampled to the full-resolution labels. The shift is real if
source-only scores clearly lower on target than on source, and learnable if the oracle clearly
beats source-only on target.

  python -m data_pipelines.build --dataset synthetic_shift --data_dir /tmp/tfds
  python benchmarks/data_shift_check.py --data_dir /tmp/tfds [--steps 300] [--scale 128x64]

About 3-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from data_pipelines import pipeline, sources  # noqa: E402
from data_pipelines.labels import IGNORE_INDEX, NUM_CLASSES  # noqa: E402


class SmallSegNet(nn.Module):
    """Conv net with a 1/4-resolution output and a dilated context, for [B, H, W, 3] inputs."""

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3] -> logits [B, H/4, W/4, 19]
        for features, stride, dilation in (
            (32, 2, 1),
            (32, 1, 1),
            (64, 2, 1),
            (64, 1, 2),
            (64, 1, 4),
        ):
            x = nn.Conv(features, (3, 3), (stride, stride), padding=dilation,
                        kernel_dilation=dilation)(x)  # fmt: skip
            x = nn.relu(nn.GroupNorm(num_groups=8)(x))
        return nn.Conv(NUM_CLASSES, (1, 1))(x)


def load(data_dir: str, dataset: str, split: str) -> list[dict]:
    """Reads a split into memory (image + label), so training does not decode PNGs."""
    split_source = sources.open_split(data_dir, dataset, split)
    return [{"image": e["image"], "label": e["label"]} for e in split_source]


def cross_entropy(logits, labels):
    """Mean over labelled pixels; logits [B, h, w, C] are upsampled to labels [B, H, W]."""
    logits = jax.image.resize(logits, labels.shape + logits.shape[-1:], "bilinear")
    valid = labels != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)


def train(train_set: list[dict], scale: tuple[int, int], steps: int, batch_size: int, seed: int):
    """Trains SmallSegNet with Adam on whole images resized keep-ratio into `scale` (w, h)."""
    dataset = pipeline.target_dataset(train_set, batch_size=batch_size, crop_size=scale[::-1],
                                      scale=scale, seed=seed)  # fmt: skip
    iterator = pipeline.make_iterator(dataset)
    model = SmallSegNet()
    params = model.init(jax.random.key(seed), jnp.zeros((1, scale[1], scale[0], 3)))["params"]
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, image, label):
        loss, grads = jax.value_and_grad(
            lambda p: cross_entropy(model.apply({"params": p}, image), label)
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        batch = next(iterator)
        params, opt_state, loss = step(params, opt_state, batch["image"], batch["label"])
        if i % 100 == 0 or i == steps - 1:
            print(f"    step {i:4d} loss {float(loss):.3f}", flush=True)
    return model, params


def evaluate(model, params, val_set: list[dict], scale, batch_size: int = 10) -> float:
    """mIoU over 19 classes (nanmean over classes in prediction ∪ label), full-res labels."""

    @jax.jit
    def confusion(image, label):
        logits = model.apply({"params": params}, image)
        logits = jax.image.resize(logits, label.shape + logits.shape[-1:], "bilinear")
        pred = jnp.argmax(logits, -1)
        valid = label != IGNORE_INDEX
        index = jnp.where(valid, label * NUM_CLASSES + pred, NUM_CLASSES**2)
        counts = jnp.bincount(index.ravel(), length=NUM_CLASSES**2 + 1)
        return counts[:-1].reshape(NUM_CLASSES, NUM_CLASSES)

    dataset = pipeline.val_dataset(val_set, batch_size=batch_size, scale=scale)
    matrix = sum(np.asarray(confusion(b["image"], b["label"])) for b in dataset)
    intersection = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(np.where(union > 0, intersection / union, np.nan)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--dataset", default="synthetic_shift/default")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scale", default="128x64", help="training / test scale WxH")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scale = tuple(int(v) for v in args.scale.split("x"))
    data = {s: load(args.data_dir, args.dataset, s) for s in
            ('source_train', 'target_train', 'source_val', 'target_val')}  # fmt: skip
    results = {}
    for name, train_split in (
        ("source-only", "source_train"),
        ("target-supervised", "target_train"),
    ):
        start = time.time()
        print(f"{name}: training on {train_split} for {args.steps} steps", flush=True)
        model, params = train(data[train_split], scale, args.steps, args.batch_size, args.seed)
        results[name] = {
            s: evaluate(model, params, data[s], scale) for s in ("source_val", "target_val")
        }
        print(f"  done in {time.time() - start:.0f} s: {results[name]}", flush=True)
    print("\n| model | source_val mIoU | target_val mIoU |\n|---|---|---|")
    for name, scores in results.items():
        print(f"| {name} | {100 * scores['source_val']:.1f} | {100 * scores['target_val']:.1f} |")


if __name__ == "__main__":
    main()
