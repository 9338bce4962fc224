"""Rare-class sampling (RCS), exactly as DAFormer `mmseg/datasets/uda_dataset.py`.

Class probabilities from the source set's pixel statistics: with f_c the share of all labelled
source pixels that belong to class c (classes with no pixel are left out),
    p(c) = softmax_c((1 - f_c) / T),   T = 0.01.
A sample draws c ~ p, then uniformly one source image with more than `min_pixels` (3000) pixels
of c (counted on the full-resolution label at build time), then crops it; the crop is re-drawn up
to 10 times until it holds more than `min_pixels * min_crop_ratio` (1500) pixels of c (the 10th
re-draw is kept unchecked). DAFormer re-runs its whole pipeline per re-draw; only the crop is
random there (the flip does not change a count), so re-cropping the decoded image is the same
distribution without decoding again. The target image is uniform and independent.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RcsConfig:
    """DAFormer's `rare_class_sampling` settings.

    Attributes:
      temperature: class temperature T (`class_temp`).
      min_pixels: an image is a candidate for class c if it has more pixels of c than this.
      min_crop_ratio: a crop is kept once it has > min_pixels * min_crop_ratio pixels of c.
    """

    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5


def rcs_class_probabilities(
    class_pixels: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """The RCS class distribution.

    Args:
      class_pixels: int [N, C] per-image pixel counts of each class.
      temperature: T.

    Returns:
      (classes int64 [K], probabilities float64 [K]) over the K classes with any pixel, ordered by
      ascending total count as DAFormer lists them.
    """
    totals = np.asarray(class_pixels, np.int64).sum(axis=0)
    classes = np.flatnonzero(totals > 0)
    classes = classes[np.argsort(totals[classes], kind="stable")]
    freq = totals[classes] / totals[classes].sum()
    logits = (1.0 - freq) / temperature
    probs = np.exp(logits - logits.max())
    return classes, probs / probs.sum()


class RareClassSampler:
    """Draws (class, image index) pairs as DAFormer's `get_rare_class_sample`.

    Args:
      class_pixels: int [N, C] per-image class pixel counts of the whole source split.
      config: RCS settings.

    Every process samples from the whole split: the processes read disjoint positions of one
    global stream (`pipeline.py`), so the class distribution is exactly DAFormer's.
    """

    def __init__(self, class_pixels: np.ndarray, config: RcsConfig):
        class_pixels = np.asarray(class_pixels, np.int64)
        self.config = config
        self.classes, self.probs = rcs_class_probabilities(class_pixels, config.temperature)
        self.candidates: dict[int, np.ndarray] = {}
        empty = []
        for c in self.classes:
            eligible = np.flatnonzero(class_pixels[:, c] > config.min_pixels)
            if len(eligible) == 0:
                empty.append(int(c))
            self.candidates[int(c)] = eligible
        if empty:
            raise ValueError(
                f"RCS: classes {empty} have no image with more than {config.min_pixels} pixels "
                "(DAFormer asserts the same); lower min_pixels for small images"
            )

    def sample(self, rng: np.random.Generator) -> tuple[int, int]:
        """Draws a class c ~ p and a candidate image of c.

        Args:
          rng: numpy generator.

        Returns:
          (class id, image index).
        """
        c = int(self.classes[rng.choice(len(self.classes), p=self.probs)])
        candidates = self.candidates[c]
        return c, int(candidates[rng.integers(len(candidates))])
