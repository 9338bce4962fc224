"""Cityscapes -> Dark Zurich with PGPC (60k iterations, as the released CS -> Dark Zurich runs).

python -m pgpc_jax.main --config configs/cs2darkzurich.py --workdir runs/cs2dz
"""

from configs import base, cs2darkzurich_daformer


def get_config():
    config = base.use_pgpc(cs2darkzurich_daformer.get_config())
    config.num_train_steps = 60_000
    return config
