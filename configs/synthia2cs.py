"""SYNTHIA -> Cityscapes: the GTA recipe with SYNTHIA at its native 1280x760, the method as the
config's argument (default PGPC). No SYNTHIA config of PGPC was released: this is the released GTA
setting (lambda_t 0.8, contrast weight 1, 60k iterations) on DAFormer's SYNTHIA data. Evaluated on
the 16 classes SYNTHIA shares with Cityscapes (mIoU16) and the usual 13.

  python -m pgpc_jax.main --config configs/synthia2cs.py --workdir runs/synthia2cs
  python -m pgpc_jax.main --config configs/synthia2cs.py:daformer --workdir runs/synthia2cs_daformer
  python -m pgpc_jax.main --config configs/synthia2cs.py:sepico --workdir runs/synthia2cs_sepico

SePiCo released no SYNTHIA config either (only GTA -> Cityscapes and Cityscapes -> Dark Zurich,
although the paper reports SYNTHIA): `:sepico` is its released GTA setting (40k iterations, seed
76, 640x640 source crops, the whole 1280x640 target) on SYNTHIA at 1280x760.
"""

from configs import gta2cs


def benchmark_config():
    config = gta2cs.benchmark_config()
    config.data.source.dataset = "synthia/daformer"
    config.data.source.scale = (1280, 760)
    return config


def get_config(method: str | None = None):
    return gta2cs.with_method(benchmark_config(), method)
