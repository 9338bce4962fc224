"""Datasets and input pipelines of pgpc_jax.

- `labels`: the 19 Cityscapes classes, palette, mIoU16 / mIoU13 subsets and the id maps.
- `build`: the CLI that converts GTA5, Cityscapes, SYNTHIA, Dark Zurich, a user's folder pair, or the
  generated `synthetic_shift` dataset into TFDS ArrayRecord files (one builder module each).
- `sources.open_split`: a built split as a `Sequence[dict]`.
- `pipeline`: grain pipelines (source with rare-class sampling, target, validation) and iterators.
- `fda`: FDA's low-frequency amplitude swap.
"""
