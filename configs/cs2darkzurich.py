"""Cityscapes -> Dark Zurich (day to night), the method as the config's argument (default PGPC,
60k iterations as the released CS -> Dark Zurich runs; DAFormer 40k).

The DAFormer recipe with Cityscapes (1024x512) as the labelled source and the Dark Zurich night
training images as the target, both at half resolution (Dark Zurich 1920x1080 -> 960x540), tested
on the 50 labelled Dark Zurich val night images at 960x540 with full-resolution labels. Dark
Zurich has no rectification border or ego car: every pseudo-label row is kept.

  python -m pgpc_jax.main --config configs/cs2darkzurich.py --workdir runs/cs2dz
  python -m pgpc_jax.main --config configs/cs2darkzurich.py:daformer --workdir runs/cs2dz_daformer
  python -m pgpc_jax.main --config configs/cs2darkzurich.py:sepico --workdir runs/cs2dz_sepico

SePiCo takes its released day-night variant (`sepico.day_night`): each night training image comes
with its paired day image (`data.target.paired_day`, from Dark Zurich's correspondence files), the
teacher labels the night image from both, the decode head's cross-entropy is class-weighted, and
evaluation reweights the class scores (`eval.class_reweight` 0.16); Cityscapes at 1280x640 cut to 640x640, Dark Zurich at 1280x720, 60k iterations, seed 42.
"""

from configs import gta2cs


def benchmark_config():
    config = gta2cs.benchmark_config()
    data = config.data
    data.source.dataset = "cityscapes/daformer"
    data.source.split = "train"
    data.source.scale = (1024, 512)
    data.target.dataset = "dark_zurich/daformer"
    data.target.split = "train_night"
    data.target.scale = (960, 540)
    data.val.dataset = "dark_zurich/daformer"
    data.val.split = "val"
    data.val.scale = (960, 540)
    config.uda.pseudo_ignore_top = 0
    config.uda.pseudo_ignore_bottom = 0
    return config


# SePiCo's released Cityscapes -> Dark Zurich setting (`experiments.py` id 8,
# `uda_cityscapes_to_dark_zurich_640x640_no_crop.py`): Cityscapes resized into 1280x640 and cut
# to 640x640; the whole 1280x720 night image (cut on device by the class-balanced crop) with its
# paired day image; testing at 1280x720; 60k iterations; seed 42.
SEPICO_SOURCE_SCALE = (1280, 640)
SEPICO_TARGET_SCALE = (1280, 720)
SEPICO_NUM_TRAIN_STEPS = 60_000
SEPICO_SEED = 42
SEPICO_TEST_CLASS_REWEIGHT = 0.16


def with_sepico_day_night(config):
    """SePiCo's day-night variant on the Dark Zurich benchmark, as released."""
    gta2cs.with_sepico_data(config, target_scale=SEPICO_TARGET_SCALE)
    config.data.source.scale = SEPICO_SOURCE_SCALE
    config.data.target.paired_day = True
    config.sepico.day_night = True
    # The released test of the day-night model reweights the night images' class scores.
    config.eval.class_reweight = SEPICO_TEST_CLASS_REWEIGHT
    config.num_train_steps = SEPICO_NUM_TRAIN_STEPS
    config.seed = SEPICO_SEED
    return config


def get_config(method: str | None = None):
    config = gta2cs.with_method(benchmark_config(), method)
    if config.method == "sepico":
        with_sepico_day_night(config)
    return config
