"""Cityscapes -> Dark Zurich source-only baseline (DAFormer architecture, source CE only).

python -m pgpc_jax.main --config configs/cs2darkzurich_source_only.py --workdir runs/cs2dz_so
"""

from configs import cs2darkzurich_daformer


def get_config():
    config = cs2darkzurich_daformer.get_config()
    config.uda.method = "source_only"
    config.uda.fd_lambda = 0.0
    return config
