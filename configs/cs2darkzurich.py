"""Cityscapes -> Dark Zurich (day to night), the method as the config's argument (default PGPC,
60k iterations as the released CS -> Dark Zurich runs; DAFormer 40k).

The DAFormer recipe with Cityscapes (1024x512) as the labelled source and the Dark Zurich night
training images as the target, both at half resolution (Dark Zurich 1920x1080 -> 960x540), tested
on the 50 labelled Dark Zurich val night images at 960x540 with full-resolution labels. Dark
Zurich has no rectification border or ego car: every pseudo-label row is kept.

  python -m pgpc_jax.main --config configs/cs2darkzurich.py --workdir runs/cs2dz
  python -m pgpc_jax.main --config configs/cs2darkzurich.py:daformer --workdir runs/cs2dz_daformer
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


def get_config(method: str | None = None):
    if method == "sepico":
        # SePiCo's Cityscapes -> Dark Zurich runs use its day-night variant (paired daytime
        # images, day/night probability mixing, class weights), which is not implemented.
        raise ValueError(
            "configs/cs2darkzurich.py:sepico: SePiCo's day-night variant (sepico_dark) is not "
            "implemented yet; use sepico on configs/gta2cs.py, synthia2cs.py or synthetic.py"
        )
    return gta2cs.with_method(benchmark_config(), method)
