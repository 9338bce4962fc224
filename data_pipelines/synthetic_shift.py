"""`synthetic_shift`: the project's embedded domain-shift dataset, generated from a seed.

Source domain: flat "rendered" street scenes; target domain: the same kind of layouts drawn
independently, in a "photographic" style (see `synthetic_scenes`). Both are labelled in the
19-class Cityscapes space (train, class 16, never occurs). Splits:
  source_train, source_val   rendered style
  target_train, target_val   photographic style (UDA trainers ignore target_train's labels)
Every image is a deterministic function of (seed, domain, split, index), so a rebuild is
pixel-identical. The `default` config (256×512, 400 + 100 images per domain) builds in about a
minute on one CPU core; `mild` is the same at half the style strength; `tiny` (64×128) is for
tests.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import synthetic_scenes
from data_pipelines.builder_base import SegmentationBuilder, progress

DOMAINS = {"source": 0, "target": 1}
SPLITS = {"train": 0, "val": 1}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Size and seed of a synthetic_shift build.

    Attributes:
      height: image height in pixels.
      width: image width in pixels.
      num_train: images per domain in the train splits.
      num_val: images per domain in the val splits.
      seed: generator seed.
      shift_strength: scales the target style's effects (1 = default, 0 = no shift).
    """

    height: int = 256
    width: int = 512
    num_train: int = 400
    num_val: int = 100
    seed: int = 0
    shift_strength: float = 1.0


def synthetic_config(
    height: int, width: int, num_train: int, num_val: int, seed: int, shift_strength: float = 1.0
):
    """A config named after its parameters, e.g. `256x512_n400_v100_s0_k0.5`."""
    strength = "" if shift_strength == 1.0 else f"_k{shift_strength:g}"
    return SyntheticConfig(
        name=f"{height}x{width}_n{num_train}_v{num_val}_s{seed}{strength}",
        description="Custom synthetic_shift size.",
        height=height,
        width=width,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        shift_strength=shift_strength,
    )


def generate_example(config: SyntheticConfig, domain: str, split: str, index: int):
    """Generates one image of the dataset.

    Args:
      config: size and seed.
      domain: 'source' or 'target'.
      split: 'train' or 'val'.
      index: image index within the split.

    Returns:
      (image uint8 [H, W, 3], label uint8 [H, W] train ids).
    """
    rng = np.random.default_rng([config.seed, DOMAINS[domain], SPLITS[split], index])
    label, albedo, geometry = synthetic_scenes.sample_scene(rng, config.height, config.width)
    if domain == "source":
        image = synthetic_scenes.render_source(label, albedo)
    else:
        image = synthetic_scenes.render_target(rng, label, albedo, geometry, config.shift_strength)
    return image, label


class SyntheticShift(SegmentationBuilder, skip_registration=True):
    """Procedural rendered → photographic street scenes, Cityscapes train ids."""

    VAL_SPLITS = ("source_val", "target_val")
    BUILDER_CONFIGS = [
        SyntheticConfig(name="default", description="256x512, 400 train + 100 val per domain."),
        SyntheticConfig(
            name="mild",
            description="256x512, 400 train + 100 val per domain, target style at half strength.",
            shift_strength=0.5,
        ),
        SyntheticConfig(
            name="tiny",
            description="64x128, 12 train + 4 val per domain (tests).",
            height=64,
            width=128,
            num_train=12,
            num_val=4,
        ),
    ]

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to read: everything is generated.
        config = self.builder_config
        return {
            f"{domain}_{split}": self._generate_synthetic(domain, split, count)
            for domain in DOMAINS
            for split, count in (("train", config.num_train), ("val", config.num_val))
        }

    def _generate_synthetic(self, domain: str, split: str, count: int):
        name = f"{domain}_{split}"
        self._start_split(name)
        for index in progress(list(range(count)), f"{self.name}/{name}"):
            image, label = generate_example(self.builder_config, domain, split, index)
            yield self.make_example(name, f"{name}_{index:05d}", image, label)
        self._finish_split(name)
